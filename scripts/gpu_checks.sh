#!/usr/bin/env bash
# GPU checks in one short run: both trainers on the tiny SDXL in fp16 and bf16 (full UNet and LoRA), and on the tiny
# SD3 and FLUX twins in bf16 (the flow-matching families), each checked
# for values (finite losses, weights changed, RLHF's DPO logits ~ 0 before the first update, peak memory), then
# the real-size flow preset (one LoRA bf16 step of each script at 1024 px on SD3.5-medium with random weights, and on
# FLUX.1-dev too with FLOW_REAL_SIZE="sd3 flux": peak memory per GPU), then the step-cost benchmark's GPU preset on
# a real-size SDXL with random weights (no download).
# Usage (on a CUDA machine with the requirements installed): bash scripts/gpu_checks.sh [OUT_DIR]
# On an offline machine whose image lacks some requirements (seen: diffusers, open_clip_torch, datasets and its
# dill/multiprocess, ftfy, wcwidth), download their wheels here with `pip download --no-deps -d .whl ...` (for
# multiprocess add --only-binary=:all: --python-version of that machine), carry .whl (git ignores it), and run
# `python3 -m pip install --no-deps --no-index .whl/*.whl` there first.
# Set SKIP_BENCHMARK=1 to skip the step-cost benchmark, FLOW_REAL_SIZE="" to skip the real-size flow preset, FLUX_PROBE=1
# to run scripts/flux_cuda_probe.py first (FLUX_PROBE_REAL="off" for its FLUX.1-dev step without cuDNN attention only),
# CONFIGS="" to skip the tiny-model trainings.
set -uo pipefail
OUT="${1:-${OUT:-}}"
case "$OUT" in ""|/*) ;; *) OUT="$PWD/$OUT" ;; esac  # a folder given relative to where this was run from
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_checks_out}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT  # also on an early exit or Ctrl-C: the real-size models there take 16-33 GB
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled PYTHONPATH="$PWD:${PYTHONPATH:-}"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi"
"$PY" -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"

# Without the tiny models or the data every run below would fail with a misleading message: stop here instead.
"$PY" -m sharpening.tiny "$WORK/tiny" >/dev/null || { echo "FAILED: could not build the tiny SDXL"; exit 1; }
"$PY" -m sharpening.tiny "$WORK/tiny_sd3" --sd3 >/dev/null || { echo "FAILED: could not build the tiny SD3"; exit 1; }
"$PY" -m sharpening.tiny "$WORK/tiny_flux" --flux >/dev/null || { echo "FAILED: could not build the tiny FLUX"; exit 1; }
# The values each training run must show: python check_run.py BASE OUT VARIANT KIND LOG DENOISER
cat >"$WORK/check_run.py" <<'PY'
import math, re, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

base, out, variant, kind, log, denoiser = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5]), sys.argv[6]
problems = []
events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
events.Reload()
losses = [e.value for e in events.Scalars("loss")]
if not losses or not all(math.isfinite(v) for v in losses):
    problems.append(f"losses not all finite: {losses}")
if kind == "lora":
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    changed = any(v.float().abs().sum() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)
else:
    trained = load_file(out / denoiser / "diffusion_pytorch_model.safetensors")
    original = load_file(base / denoiser / "diffusion_pytorch_model.safetensors")
    changed = any(not torch.equal(trained[k].float(), original[k].float()) for k in original)
if not changed:
    problems.append("weights unchanged")
logits = None
if variant == "rlhf":
    logits = events.Scalars("dpo_logits")[0].value  # step 1: computed before the first update
    if abs(logits) > 0.05:
        problems.append(f"DPO logits {logits:.4g} at step 0 (policy and reference should agree)")
peak = re.search(r"Peak memory of this process: (.*)\.", log.read_text())
print(f"    losses {[round(v, 5) for v in losses]}, weights changed: {changed}"
      + (f", DPO logits at step 0: {logits:.2e}" if logits is not None else "")
      + f"; peak memory: {peak[1] if peak else 'not logged'}")
if problems or not peak:
    print("    FAILED: " + "; ".join(problems or ["no peak memory line"]))
    sys.exit(1)
PY
"$PY" - "$WORK" <<'PY' || { echo "FAILED: could not write the training data"; exit 1; }
import sys
from pathlib import Path
from testing.images import write_image_folder
work = Path(sys.argv[1])
write_image_folder(work / "data", count=8)
(work / "prompts.txt").write_text("a red square\na blue circle\na green triangle\na yellow square\n")
PY

status=0
# FLUX on CUDA (FLUX_PROBE=1): one training step per setting, SDPA with and without cuDNN's attention (and torch's
# fused RMSNorm against a float32 one), on the tiny twin and on FLUX.1-dev's config (one process per setting: a kernel
# failure can end the process; CUDA_LAUNCH_BLOCKING=1 names the kernel that fails). scripts/flux_cuda_probe.py.
if [ -n "${FLUX_PROBE:-}" ]; then
  CUDA_LAUNCH_BLOCKING=1 "$PY" scripts/flux_cuda_probe.py --model "$WORK/tiny_flux" 2>&1 | grep "^tiny\|Error" | tee "$OUT/flux_probe_tiny.log"
  for cudnn in ${FLUX_PROBE_REAL-on off}; do
    CUDA_LAUNCH_BLOCKING=1 timeout 300 "$PY" scripts/flux_cuda_probe.py --real --cudnn "$cudnn" --checkpointing >"$OUT/flux_probe_real_$cudnn.log" 2>&1 \
      || echo "FLUX.1-dev probe, cuDNN attention $cudnn: exit $?"
    grep "FLUX.1-dev\|Error" "$OUT/flux_probe_real_$cudnn.log" | tail -3
  done
fi
# [family:]variant:precision:kind (family sdxl when left out)
CONFIGS="${CONFIGS-sft:fp16:full sft:bf16:lora rlhf:fp16:full rlhf:bf16:lora rlhf:fp16:lora sd3:sft:bf16:full sd3:rlhf:bf16:lora flux:sft:bf16:lora flux:rlhf:bf16:full}"
for cfg in $CONFIGS; do
  [ "$(tr -cd : <<<"$cfg" | wc -c)" -eq 2 ] && cfg="sdxl:$cfg"
  IFS=: read -r family variant precision kind <<<"$cfg"
  script=train_${variant}_diffusion_sharpening.py
  base="$WORK/tiny"; denoiser=unet; flow=()
  if [ "$family" != sdxl ]; then
    base="$WORK/tiny_$family"; denoiser=transformer; flow=(--max_sequence_length 32)
  fi
  data=(--train_data_dir "$WORK/data"); [ "$variant" = rlhf ] && data=(--prompt_file "$WORK/prompts.txt")
  lora=(); [ "$kind" = lora ] && lora=(--use_lora)
  # RLHF without the reward-gap term, so the first update's logged DPO logits must be ~0 (policy == reference)
  margin=(); [ "$variant" = rlhf ] && margin=(--reward_margin_scale 0)
  name="${family}_${variant}_${precision}_${kind}"
  log="$OUT/train_$name.log"
  start=$SECONDS
  "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision "$precision" --dynamo_backend no "$script" \
    --pretrained_model_name_or_path "$base" "${data[@]}" "${lora[@]}" "${flow[@]}" --output_dir "$WORK/out_$name" \
    --resolution 64 --train_batch_size 2 --max_train_steps 4 --num_noisy_latents 3 --trajectory_nums 3 --infer_steps 10 \
    --learning_rate 1e-4 --reward_model brightness --report_to tensorboard --seed 0 "${margin[@]}" \
    --gradient_checkpointing --mixed_precision "$precision" --checkpointing_steps 2 >"$log" 2>&1
  rc=$?
  secs=$((SECONDS - start))
  echo "$family $variant $precision $kind: exit $rc, ${secs}s"
  if [ $rc -eq 0 ]; then
    "$PY" "$WORK/check_run.py" "$base" "$WORK/out_$name" "$variant" "$kind" "$log" "$denoiser" || status=1
  else
    status=1; tail -20 "$log"
  fi
done

# Real-size flow models (random weights from the published configs, initialised on the GPU): 16 GB (SD3.5-medium)
# or 33 GB (FLUX.1-dev) written to $WORK, removed after their runs.
for family in ${FLOW_REAL_SIZE-sd3}; do
  base="$WORK/real_$family"
  start=$SECONDS
  "$PY" -m sharpening.tiny "$base" --flow_size "$family" --device cuda >"$OUT/build_real_$family.log" 2>&1 \
    || { echo "real-size $family: build failed"; tail -20 "$OUT/build_real_$family.log"; status=1; continue; }
  echo "real-size $family built in $((SECONDS - start))s"
  for variant in sft rlhf; do
    data=(--train_data_dir "$WORK/data"); [ "$variant" = rlhf ] && data=(--prompt_file "$WORK/prompts.txt")
    margin=(); [ "$variant" = rlhf ] && margin=(--reward_margin_scale 0)
    name="real_${family}_${variant}"
    log="$OUT/train_$name.log"
    start=$SECONDS
    "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
      "train_${variant}_diffusion_sharpening.py" --pretrained_model_name_or_path "$base" "${data[@]}" --use_lora \
      --output_dir "$WORK/out_$name" --resolution 1024 --train_batch_size 1 --max_train_steps 1 --learning_rate 1e-4 \
      --reward_model brightness --report_to tensorboard --seed 0 "${margin[@]}" --gradient_checkpointing \
      --mixed_precision bf16 --checkpointing_steps 1000 >"$log" 2>&1
    rc=$?
    echo "real-size $family $variant bf16 lora 1024px: exit $rc, $((SECONDS - start))s"
    if [ $rc -eq 0 ]; then
      "$PY" "$WORK/check_run.py" "$base" "$WORK/out_$name" "$variant" lora "$log" transformer || status=1
    else
      status=1; tail -20 "$log"
    fi
    rm -rf "$WORK/out_$name"
  done
  rm -rf "$base"
done

if [ -z "${SKIP_BENCHMARK:-}" ]; then
  "$PY" benchmarks/step_cost.py --preset gpu --json "$OUT/step_cost.json" 2>&1 | tee "$OUT/step_cost.log" || status=1
fi
exit $status
