#!/usr/bin/env bash
# SFT Diffusion-Sharpening on SD3.5-medium (flow matching), LoRA in bf16. A starting point: the learning rate, rank and
# step budget are diffusers' SD3 LoRA defaults, not tuned for sharpening, and nothing here has run at this size yet.
# Usage: DATASET_NAME=lambdalabs/naruto-blip-captions REWARD=clip bash scripts/sd3_sft.sh [extra flags...]
set -euo pipefail
# Paths given relative to where this was run from (a local dataset, the output folder) stay so after
# the cd to the repository root below.
from_caller() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
if [ -n "${DATASET_NAME:-}" ] && [ -e "$DATASET_NAME" ]; then DATASET_NAME="$(from_caller "$DATASET_NAME")"; fi
if [ -n "${OUTPUT_DIR:-}" ]; then OUTPUT_DIR="$(from_caller "$OUTPUT_DIR")"; fi
cd "$(dirname "$0")/.."
export MODEL_NAME="${MODEL_NAME:-stabilityai/stable-diffusion-3.5-medium}"
export DATASET_NAME="${DATASET_NAME:?set DATASET_NAME to a hub dataset id or a local imagefolder}"
REWARD="${REWARD:-clip}"

accelerate launch --main_process_port "${PORT:-10950}" train_sft_diffusion_sharpening.py \
  --pretrained_model_name_or_path="$MODEL_NAME" \
  --dataset_name="$DATASET_NAME" \
  --resolution=512 --center_crop --random_flip \
  --max_sequence_length=77 \
  --infer_steps=28 --guidance_scale=4.5 \
  --use_lora --lora_rank=16 \
  --train_batch_size=1 --gradient_accumulation_steps=4 --gradient_checkpointing \
  --max_train_steps=2000 \
  --learning_rate=1e-04 --lr_scheduler="constant" \
  --mixed_precision="bf16" \
  --report_to="wandb" \
  --validation_prompt="a photo of a red fox sitting in the snow" --validation_steps 250 \
  --checkpointing_steps=500 \
  --output_dir="${OUTPUT_DIR:-output_dir/sd3_sft}" \
  --reward_model="$REWARD" \
  "$@"
