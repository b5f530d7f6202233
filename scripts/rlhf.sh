#!/usr/bin/env bash
# RLHF Diffusion-Sharpening on real SDXL: prompts only, no images needed. The seed's command also passes --center_crop
# --random_flip, which act on training images; RLHF generates its own, so they are left out here.
# Usage: PROMPT_FILE=prompts.txt REWARD=image_reward bash scripts/rlhf.sh [extra flags...]
#    or: DATASET_NAME=lambdalabs/naruto-blip-captions bash scripts/rlhf.sh   (its caption column gives the prompts)
# REWARD: clip | image_reward | pickscore | hpsv2 | aesthetic | compositional | mllm | a mix such as "clip:1.0,image_reward:0.5".
# For mllm set OPENAI_API_KEY (and optionally --base_url for a local OpenAI-compatible server).
set -euo pipefail
# Paths given relative to where this was run from (a prompt file, a local dataset, the output folder) stay so after
# the cd to the repository root below.
from_caller() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
if [ -n "${PROMPT_FILE:-}" ]; then PROMPT_FILE="$(from_caller "$PROMPT_FILE")"; fi
if [ -n "${DATASET_NAME:-}" ] && [ -e "$DATASET_NAME" ]; then DATASET_NAME="$(from_caller "$DATASET_NAME")"; fi
if [ -n "${OUTPUT_DIR:-}" ]; then OUTPUT_DIR="$(from_caller "$OUTPUT_DIR")"; fi
cd "$(dirname "$0")/.."
export MODEL_NAME="${MODEL_NAME:-stabilityai/stable-diffusion-xl-base-1.0}"
export VAE_NAME="${VAE_NAME:-madebyollin/sdxl-vae-fp16-fix}"
REWARD="${REWARD:-clip}"
if [ -n "${PROMPT_FILE:-}" ]; then
  PROMPTS=(--prompt_file="$PROMPT_FILE")
else
  PROMPTS=(--dataset_name="${DATASET_NAME:?set PROMPT_FILE (one prompt per line) or DATASET_NAME}")
fi
XFORMERS=()
python -c "import xformers" 2>/dev/null && XFORMERS=(--enable_xformers_memory_efficient_attention)

accelerate launch --main_process_port "${PORT:-10950}" train_rlhf_diffusion_sharpening_sdxl.py \
  --pretrained_model_name_or_path="$MODEL_NAME" \
  --pretrained_vae_model_name_or_path="$VAE_NAME" \
  "${PROMPTS[@]}" \
  ${XFORMERS[@]+"${XFORMERS[@]}"} \
  --resolution=512 \
  --proportion_empty_prompts=0.2 \
  --train_batch_size=1 \
  --gradient_accumulation_steps=4 --gradient_checkpointing \
  --max_train_steps=10000 \
  --use_8bit_adam \
  --learning_rate=1e-06 --lr_scheduler="constant" --lr_warmup_steps=0 \
  --mixed_precision="fp16" \
  --report_to="wandb" \
  --validation_prompt="a cute Sundar Pichai creature" --validation_epochs 5 \
  --checkpointing_steps=5000 \
  --output_dir="${OUTPUT_DIR:-output_dir/rlhf}" \
  --reward_model="$REWARD" \
  --beta_dpo=2500 --reward_margin_scale=1.0 --guidance_scale=5.0 \
  "$@"
