#!/usr/bin/env python
"""Does sharpening work? The paper's comparison at toy scale, on HELD-OUT prompts, at an equal number of
optimizer steps (and the same batch size, learning rate, data and seeds):

    base             the shipped toy model, untouched
    standard-ft      the SFT script with n = 1, m = 1: no choice among trajectories = plain fine-tuning
    sft-sharpening   SFT with n = 3 candidates, m = 3 steps (Algorithm 1)
    rlhf-sharpening  RLHF with n = 3, m = 3 (Algorithm 2)

Every run saves a checkpoint every `--eval_every` steps; all checkpoints are evaluated with the same seeds
(evaluate.py), which gives the reward curve over steps. `--ablation` adds SFT runs over n (m = 3) and m
(n = 3), as the paper's Tables 2 and 3.

    python benchmarks/quality.py --steps 120 --eval_every 40            # CPU: tens of minutes
    python benchmarks/quality.py --steps 120 --eval_every 40 --device cuda
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toyworld.recipe import COMMON, MODEL, RLHF, SFT, STANDARD_FT, check_evaluable, check_spec_parts, check_trained_with, checkpoint_spec, cpu_threads, launch, override_target, overrides_for, write_data  # noqa: E402

SFT_SCRIPT = "train_sft_diffusion_sharpening_sdxl.py"
RLHF_SCRIPT = "train_rlhf_diffusion_sharpening_sdxl.py"


def variants(ablation: bool) -> dict[str, tuple[str, dict]]:
    runs = {
        "standard-ft": (SFT_SCRIPT, STANDARD_FT),
        "sft-sharpening": (SFT_SCRIPT, SFT),
        "rlhf-sharpening": (RLHF_SCRIPT, RLHF),
    }
    if ablation:  # Table 2: n at m = 3; Table 3: m at n = 3 (n=3, m=3 is sft-sharpening itself)
        for n in (1, 5):
            runs[f"sft-n{n}-m3"] = (SFT_SCRIPT, {**SFT, "num_noisy_latents": n, "trajectory_nums": 3})
        for m in (1, 5):
            runs[f"sft-n3-m{m}"] = (SFT_SCRIPT, {**SFT, "num_noisy_latents": 3, "trajectory_nums": m})
    return runs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--work_dir", default=str(ROOT / "output" / "quality"))
    p.add_argument("--steps", type=int, default=120, help="Optimizer steps of every run.")
    p.add_argument("--eval_every", type=int, default=40, help="Checkpoint (and evaluate) every N steps.")
    p.add_argument("--learning_rate", type=float, default=None, help="Override the recipe's learning rate for every run.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[VARIANT:]FLAG=VALUE",
                   help="Override a training flag for every run, or for one variant, e.g. --set rlhf-sharpening:reward_margin_scale=0 "
                        "or --set max_grad_norm=0.5 (repeatable).")
    p.add_argument("--train_images", type=int, default=512)
    p.add_argument("--eval_prompts", type=int, default=112, help="Evaluation prompts (the held-out split has 112).")
    p.add_argument("--eval_split", default="heldout", choices=["heldout", "train_pairs"],
                   help="heldout (the benchmark): object pairs never seen in training. train_pairs: the prompts the "
                        "fine-tunes trained on, a diagnostic of whether the reward is optimised at all.")
    p.add_argument("--images_per_prompt", type=int, default=2)
    p.add_argument("--eval_steps", type=int, default=20)
    p.add_argument("--ablation", action="store_true", help="Also the n and m ablation (SFT).")
    p.add_argument("--only", nargs="*", default=None, help="Run only these variants.")
    p.add_argument("--device", default="cpu", help="Evaluation device; training uses what accelerate finds.")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip_training", action="store_true", help="Re-evaluate the runs already in --work_dir.")
    args = p.parse_args(argv)
    check_spec_parts([], {"--work_dir": args.work_dir, "--model": args.model})
    return args


def main(args: argparse.Namespace) -> dict:
    import torch

    import evaluate

    if args.steps % args.eval_every:
        raise SystemExit("--steps must be a multiple of --eval_every (so the last checkpoint is the final model).")
    work, model = Path(args.work_dir), Path(args.model)
    suffix = "" if args.eval_split == "heldout" else f"_{args.eval_split}"  # outputs of each split side by side
    eval_dir = work / f"eval{suffix}"
    threads = args.threads or cpu_threads()
    runs = variants(args.ablation)
    if args.only:
        if set(args.only) - set(runs):
            raise SystemExit(f"--only names unknown variants {sorted(set(args.only) - set(runs))}; variants: {sorted(runs)}")
        runs = {k: v for k, v in runs.items() if k in args.only}
    unknown = {override_target(item) for item in args.overrides} - set(runs) - {""}
    if unknown:
        raise SystemExit(f"--set names unknown variants {sorted(unknown)}; variants: {sorted(runs)}")
    data, prompt_file = write_data(work / "data", args.train_images)
    run_flags = {}
    for name, (script, settings) in runs.items():
        flags = {**COMMON, **settings, "pretrained_model_name_or_path": str(model), "output_dir": str(work / name),
                 "max_train_steps": args.steps, "checkpointing_steps": args.eval_every}
        if args.learning_rate:
            flags["learning_rate"] = args.learning_rate
        flags |= {"train_data_dir": str(data)} if script == SFT_SCRIPT else {"prompt_file": str(prompt_file)}
        run_flags[name] = flags | overrides_for(name, args.overrides)  # --set last: it may name other data
        check_evaluable(run_flags[name])
    seconds = {}
    for name, (script, _) in (runs if args.skip_training else {}).items():
        check_trained_with(script, run_flags[name])
    for name, (script, _) in ({} if args.skip_training else runs).items():
        print(f"[quality] training {name} for {args.steps} steps (log {work / (name + '.log')})", flush=True)
        seconds[name] = round(launch(script, run_flags[name], work / f"{name}.log", threads), 1)
        print(f"[quality]   {seconds[name]:.0f} s", flush=True)

    checkpoints = list(range(args.eval_every, args.steps + 1, args.eval_every))
    models = [f"base={model}"] + [f"{name}@{step}={model}," + checkpoint_spec(run_flags[name], work / name / f"checkpoint-{step}", str(model))
                                  for name in runs for step in checkpoints]
    torch.set_num_threads(threads)
    record = evaluate.main(evaluate.parse_args(
        [f"--model={m}" for m in models] + [
            "--toy_split", args.eval_split, "--num_prompts", str(args.eval_prompts), "--images_per_prompt", str(args.images_per_prompt),
            "--steps", str(args.eval_steps), "--guidance_scale", str(COMMON["guidance_scale"]), "--reward_model", "toy",
            "--device", args.device, "--output_dir", str(eval_dir), "--seed", "1234", "--grid_prompts", "8",
        ]))
    summary = record["summary"]

    def cell(entry, key="mean", se="se"):
        return evaluate.format_estimate(entry[key], entry[se], signed=key == "diff")

    final = args.steps
    split_name = {"heldout": "Held-out prompts", "train_pairs": "TRAIN prompts (diagnostic, not the benchmark)"}[args.eval_split]
    batches = {name: int(flags["train_batch_size"]) * int(flags.get("gradient_accumulation_steps", 1)) for name, flags in run_flags.items()}
    batch = (f"batch {next(iter(batches.values()))} for every fine-tune" if len(set(batches.values())) == 1
             else "batch " + ", ".join(f"{size} ({name})" for name, size in batches.items()))
    lines = [f"{split_name}: {len(record['prompts'])} x {args.images_per_prompt} seeds; {args.steps} optimizer steps of "
             f"{batch}; toy reward (mean ± SE over prompts; Δ paired vs base).", "",
             "| model | toy reward | objects | relation | Δ vs base | train s |", "|---|---|---|---|---|---|",
             f"| base | {cell(summary['base']['toy'])} | {cell(summary['base']['toy/objects'])} | {cell(summary['base']['toy/relation'])} | — | — |"]
    for name in runs:
        s = summary[f"{name}@{final}"]
        lines.append(f"| {name} | {cell(s['toy'])} | {cell(s['toy/objects'])} | {cell(s['toy/relation'])} | {cell(s['toy'], 'diff', 'diff_se')} | {seconds.get(name, '')} |")
    lines += ["", f"Reward curve (toy reward, mean over the {split_name.split(' (')[0].lower()}) by optimizer step:", "",
              "| model | 0 | " + " | ".join(str(s) for s in checkpoints) + " |", "|---|---|" + "---|" * len(checkpoints)]
    base_mean = summary["base"]["toy"]["mean"]
    for name in runs:
        lines.append(f"| {name} | {base_mean:.3f} | " + " | ".join(f"{summary[f'{name}@{s}']['toy']['mean']:.3f}" for s in checkpoints) + " |")
    text = "\n".join(lines)
    (work / f"quality{suffix}.md").write_text(text + "\n")
    (work / f"quality{suffix}.json").write_text(json.dumps({"summary": summary, "train_seconds": seconds, "steps": args.steps,
                                                   "checkpoints": checkpoints, "learning_rate": args.learning_rate, "overrides": args.overrides,
                                                   "runs": {k: v[1] for k, v in runs.items()}}, indent=2))
    print("\n" + text + f"\n\n[quality] wrote {work / f'quality{suffix}.md'}, {work / f'quality{suffix}.json'}, grids in {eval_dir}")
    return summary


if __name__ == "__main__":
    started = time.time()
    main(parse_args())
    print(f"[quality] total {(time.time() - started) / 60:.1f} min")
