#!/usr/bin/env python
"""`make demo`: watch Diffusion-Sharpening improve a model, on a CPU, in about 15 minutes.

1. Writes the toy world's training data (an imagefolder of compositions for SFT, a prompt file for RLHF).
2. Fine-tunes the shipped toy SDXL (models/toy-sdxl) with SFT-sharpening and RLHF-sharpening, rewarded by
   the toy reward, each through `accelerate launch` exactly as on a GPU cluster (1 process).
3. Evaluates base vs both fine-tunes on HELD-OUT prompts (object pairs never seen in training), same seeds
   for every model, and prints the table; grids show before/after.

Every number it prints is measured in this run; nothing is tuned on the evaluation prompts.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from toyworld.recipe import COMMON, RLHF, SFT, cpu_threads, launch, write_data  # noqa: E402

SFT_STEPS, RLHF_STEPS = 60, 60


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default=str(ROOT / "output" / "demo"))
    p.add_argument("--model", default=str(ROOT / "models" / "toy-sdxl"))
    p.add_argument("--sft_steps", type=int, default=SFT_STEPS)
    p.add_argument("--rlhf_steps", type=int, default=RLHF_STEPS)
    p.add_argument("--train_images", type=int, default=512, help="Images in the SFT imagefolder.")
    p.add_argument("--train_batch_size", type=int, default=COMMON["train_batch_size"])
    p.add_argument("--learning_rate", type=float, default=None, help="Override the recipe's learning rate (both variants).")
    p.add_argument("--eval_split", default="heldout", choices=["heldout", "train_pairs"],
                   help="Prompts to evaluate on: held-out pairs (the result), or training pairs (for choosing settings without looking at held-out).")
    p.add_argument("--eval_prompts", type=int, default=112, help="Held-out prompts evaluated (all 112 by default).")
    p.add_argument("--images_per_prompt", type=int, default=2)
    p.add_argument("--eval_steps", type=int, default=20, help="DDIM steps of the evaluation samples.")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: the idle cores).")
    p.add_argument("--device", default="cpu", help="Evaluation device (training uses what accelerate finds).")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    started = time.time()
    work = Path(args.work_dir)
    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        raise SystemExit(f"No toy model at {model}: it ships with the repository (or rebuild it: python -m toyworld.train_base).")
    threads = args.threads or cpu_threads()
    timings = {}
    print(f"[demo] work folder {work}; {threads} CPU thread(s) per process", flush=True)

    t = time.time()
    data, prompt_file = write_data(work / "data", args.train_images)
    timings["data"] = time.time() - t

    base = {**COMMON, "pretrained_model_name_or_path": str(model), "train_batch_size": args.train_batch_size}
    lr = {"learning_rate": args.learning_rate} if args.learning_rate else {}
    print(f"[demo] SFT-sharpening: {args.sft_steps} steps, n={SFT['num_noisy_latents']} m={SFT['trajectory_nums']} (log: {work / 'sft.log'})", flush=True)
    timings["sft"] = launch("train_sft_diffusion_sharpening_sdxl.py",
                            {**base, **SFT, **lr, "max_train_steps": args.sft_steps, "train_data_dir": str(data), "output_dir": str(work / "sft")},
                            work / "sft.log", threads)
    print(f"[demo]   done in {timings['sft']:.0f} s", flush=True)
    print(f"[demo] RLHF-sharpening: {args.rlhf_steps} steps, n={RLHF['num_noisy_latents']} m={RLHF['trajectory_nums']} (log: {work / 'rlhf.log'})", flush=True)
    timings["rlhf"] = launch("train_rlhf_diffusion_sharpening_sdxl.py",
                             {**base, **RLHF, **lr, "max_train_steps": args.rlhf_steps, "prompt_file": str(prompt_file), "output_dir": str(work / "rlhf")},
                             work / "rlhf.log", threads)
    print(f"[demo]   done in {timings['rlhf']:.0f} s", flush=True)

    print(f"[demo] evaluating base, SFT and RLHF on {args.eval_prompts} {args.eval_split} prompts x {args.images_per_prompt} seeds", flush=True)
    import torch

    import evaluate

    torch.set_num_threads(threads)
    t = time.time()
    evaluate.main(evaluate.parse_args([
        "--model", f"base={model}",
        "--model", f"sft-sharpening={model},unet={work / 'sft'}",
        "--model", f"rlhf-sharpening={model},unet={work / 'rlhf'}",
        "--toy_split", args.eval_split, "--num_prompts", str(args.eval_prompts), "--images_per_prompt", str(args.images_per_prompt),
        "--steps", str(args.eval_steps), "--guidance_scale", str(COMMON["guidance_scale"]), "--reward_model", "toy",
        "--device", args.device, "--output_dir", str(work / "eval"), "--seed", "1234",
    ]))
    timings["evaluate"] = time.time() - t
    total = time.time() - started
    print("\n[demo] wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {total / 60:.1f} min")
    print(f"[demo] results: {work / 'eval' / 'results.md'} (table), {work / 'eval' / 'results.json'} (every score),")
    print(f"[demo]          {work / 'eval' / 'compare.png'} (before/after: held-out prompts x models), grid_<model>.png;")
    print(f"[demo]          fine-tuned UNets in {work / 'sft' / 'unet'} and {work / 'rlhf' / 'unet'}; training logs {work}/*.log")


if __name__ == "__main__":
    main(parse_args())
