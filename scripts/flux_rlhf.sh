#!/usr/bin/env bash
# RLHF Diffusion-Sharpening on FLUX.1-dev (flow matching, guidance-distilled), LoRA in bf16: prompts only. A starting point: the learning
# rate, rank and step budget are diffusers' FLUX LoRA defaults, not tuned for sharpening, and nothing here has run at
# this size yet.
# Usage: PROMPT_FILE=prompts.txt REWARD=image_reward bash scripts/flux_rlhf.sh [extra flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
export MODEL_NAME="${MODEL_NAME:-black-forest-labs/FLUX.1-dev}"
REWARD="${REWARD:-clip}"
if [ -n "${PROMPT_FILE:-}" ]; then
  PROMPTS=(--prompt_file="$PROMPT_FILE")
else
  PROMPTS=(--dataset_name="${DATASET_NAME:?set PROMPT_FILE (one prompt per line) or DATASET_NAME}")
fi

# FLUX.1-dev: --guidance_scale is the embedded guidance (FluxPipeline's guidance_scale); there is no negative branch.
accelerate launch --main_process_port "${PORT:-10950}" train_rlhf_diffusion_sharpening.py \
  --pretrained_model_name_or_path="$MODEL_NAME" \
  "${PROMPTS[@]}" \
  --resolution=512 \
  --max_sequence_length=77 \
  --infer_steps=28 --guidance_scale=3.5 \
  --use_lora --lora_rank=16 \
  --train_batch_size=1 --gradient_accumulation_steps=4 --gradient_checkpointing \
  --max_train_steps=2000 \
  --learning_rate=1e-04 --lr_scheduler="constant" \
  --mixed_precision="bf16" \
  --report_to="wandb" \
  --validation_prompt="a photo of a red fox sitting in the snow" --validation_steps 250 \
  --checkpointing_steps=500 \
  --output_dir="${OUTPUT_DIR:-output_dir/flux_rlhf}" \
  --reward_model="$REWARD" \
  "$@"
