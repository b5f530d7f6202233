#!/usr/bin/env bash
# RLHF Diffusion-Sharpening on FLUX.1-dev (flow matching, guidance-distilled), LoRA in bf16: scripts/sd3_rlhf.sh's recipe
# with FLUX.1-dev's model and guidance. --guidance_scale is FLUX's EMBEDDED guidance (FluxPipeline's guidance_scale);
# there is no negative branch. A starting point, not tuned for sharpening; nothing has run at this size yet.
# Usage: as scripts/sd3_rlhf.sh, e.g. PROMPT_FILE=prompts.txt REWARD=clip bash scripts/flux_rlhf.sh [extra flags...]
set -euo pipefail
export MODEL_NAME="${MODEL_NAME:-black-forest-labs/FLUX.1-dev}" OUTPUT_DIR="${OUTPUT_DIR:-$(cd "$(dirname "$0")/.." && pwd)/output_dir/flux_rlhf}"
exec bash "$(dirname "$0")/sd3_rlhf.sh" --guidance_scale=3.5 --max_sequence_length=512 "$@"
