#!/usr/bin/env bash
# GPU checks in one short run: both trainers on the tiny SDXL in fp16 and bf16 (full UNet and LoRA),
# then the step-cost benchmark's GPU preset on a real-size SDXL UNet with random weights (no download).
# Usage (on a CUDA machine with the requirements installed): bash scripts/gpu_checks.sh [OUT_DIR]
# Set SKIP_BENCHMARK=1 to run only the training checks.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu_checks_out}}"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled PYTHONPATH="$PWD:${PYTHONPATH:-}"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi"
"$PY" -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"

"$PY" -m sharpening.tiny "$WORK/tiny" >/dev/null
"$PY" - "$WORK" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import write_image_folder
work = Path(sys.argv[1])
write_image_folder(work / "data", count=8)
(work / "prompts.txt").write_text("a red square\na blue circle\na green triangle\na yellow square\n")
PY

status=0
CONFIGS="${CONFIGS:-sft:fp16:full sft:bf16:lora rlhf:fp16:full rlhf:bf16:lora rlhf:fp16:lora}"
for cfg in $CONFIGS; do
  IFS=: read -r variant precision kind <<<"$cfg"
  script=train_${variant}_diffusion_sharpening_sdxl.py
  data=(--train_data_dir "$WORK/data"); [ "$variant" = rlhf ] && data=(--prompt_file "$WORK/prompts.txt")
  lora=(); [ "$kind" = lora ] && lora=(--use_lora)
  log="$OUT/train_${variant}_${precision}_${kind}.log"
  start=$SECONDS
  "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision "$precision" --dynamo_backend no "$script" \
    --pretrained_model_name_or_path "$WORK/tiny" "${data[@]}" "${lora[@]}" --output_dir "$WORK/out_${variant}_${precision}_${kind}" \
    --resolution 64 --train_batch_size 2 --max_train_steps 4 --num_noisy_latents 3 --trajectory_nums 3 --infer_steps 10 \
    --learning_rate 1e-4 --reward_model brightness --reward_plugin tests/plugin_rewards.py --report_to none --seed 0 \
    --gradient_checkpointing --mixed_precision "$precision" --checkpointing_steps 2 >"$log" 2>&1
  rc=$?
  secs=$((SECONDS - start))
  losses=$(grep -o "loss=[^,]*" "$log" | sort -u | tr '\n' ' ')
  echo "$variant $precision $kind: exit $rc, ${secs}s, $losses"
  [ $rc -eq 0 ] || { status=1; tail -20 "$log"; }
done

if [ -z "${SKIP_BENCHMARK:-}" ]; then
  "$PY" benchmarks/step_cost.py --preset gpu --json "$OUT/step_cost.json" 2>&1 | tee "$OUT/step_cost.log" || status=1
fi
rm -rf "$WORK"
exit $status
