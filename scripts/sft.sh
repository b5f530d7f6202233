#!/usr/bin/env bash
# SFT Diffusion-Sharpening on real SDXL (the seed's command, with the script's real name).
# Usage: DATASET_NAME=lambdalabs/naruto-blip-captions REWARD=clip bash scripts/sft.sh [extra flags...]
# REWARD: clip | image_reward | pickscore | hpsv2 | aesthetic | compositional | mllm | a mix such as "clip:1.0,image_reward:0.5".
# For mllm set OPENAI_API_KEY (and optionally --base_url for a local OpenAI-compatible server).
set -euo pipefail
# Paths given relative to where this was run from (a local dataset, the output folder) stay so after
# the cd to the repository root below.
from_caller() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
if [ -n "${DATASET_NAME:-}" ] && [ -e "$DATASET_NAME" ]; then DATASET_NAME="$(from_caller "$DATASET_NAME")"; fi
if [ -n "${OUTPUT_DIR:-}" ]; then OUTPUT_DIR="$(from_caller "$OUTPUT_DIR")"; fi
cd "$(dirname "$0")/.."
export MODEL_NAME="${MODEL_NAME:-stabilityai/stable-diffusion-xl-base-1.0}"
export VAE_NAME="${VAE_NAME:-madebyollin/sdxl-vae-fp16-fix}"
export DATASET_NAME="${DATASET_NAME:?set DATASET_NAME to a hub dataset id or a local imagefolder}"
REWARD="${REWARD:-clip}"
XFORMERS=()
python -c "import xformers" 2>/dev/null && XFORMERS=(--enable_xformers_memory_efficient_attention)

accelerate launch --main_process_port "${PORT:-10950}" train_sft_diffusion_sharpening_sdxl.py \
  --pretrained_model_name_or_path="$MODEL_NAME" \
  --pretrained_vae_model_name_or_path="$VAE_NAME" \
  --dataset_name="$DATASET_NAME" \
  ${XFORMERS[@]+"${XFORMERS[@]}"} \
  --resolution=512 --center_crop --random_flip \
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
  --output_dir="${OUTPUT_DIR:-output_dir/sft}" \
  --reward_model="$REWARD" \
  "$@"
