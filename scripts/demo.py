#!/usr/bin/env python
"""`make demo`: watch Diffusion-Sharpening raise a reward, on a CPU, in 7-11 minutes.

1. Writes the toy world's training data (an imagefolder of compositions for SFT, a prompt file for RLHF).
2. Fine-tunes the shipped toy SDXL (models/toy-sdxl) with SFT-sharpening and RLHF-sharpening, each through
   `accelerate launch` exactly as on a GPU cluster (1 process), twice: rewarded by the toy compositional reward,
   and by a pixel reward (`--pixel_reward`, default saturation) whose gain the demo's budget can show.
3. Evaluates base and the four fine-tunes on HELD-OUT prompts (object pairs never seen in training), same seeds
   for every model, scores every image with both rewards, and prints each fine-tune's paired gain on the reward
   it was trained on, with the toy guards (objects, relation, clean) that would show reward hacking; grids show
   before/after.

Every number it prints is measured in this run; nothing is tuned on the evaluation prompts.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from toyworld.recipe import COMMON, RLHF, SFT, check_spec_parts, cpu_threads, launch, write_data  # noqa: E402

# 40 steps each (the reward-response benchmark's recipe runs 60): the four fine-tunes and the evaluation must fit
# in 15 minutes on a 2-core CPU; both defaults pass +3 SE on the pixel rewards by 20 steps (README).
SFT_STEPS, RLHF_STEPS = 40, 40
PIXEL_REWARD = "saturation"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default=str(ROOT / "output" / "demo"))
    p.add_argument("--model", default=str(ROOT / "models" / "toy-sdxl"))
    p.add_argument("--sft_steps", type=int, default=SFT_STEPS)
    p.add_argument("--rlhf_steps", type=int, default=RLHF_STEPS)
    p.add_argument("--train_images", type=int, default=512, help="Images in the SFT imagefolder.")
    p.add_argument("--train_batch_size", type=int, default=COMMON["train_batch_size"])
    p.add_argument("--learning_rate", type=float, default=None, help="Override the recipe's learning rate (both variants).")
    p.add_argument("--pixel_reward", default=PIXEL_REWARD, help="The second reward trained on (toy is the first).")
    p.add_argument("--eval_split", default="heldout", choices=["heldout", "train_pairs"],
                   help="Prompts to evaluate on: held-out pairs (the result), or training pairs (for choosing settings without looking at held-out).")
    p.add_argument("--eval_prompts", type=int, default=112, help="Prompts evaluated, the first N of --eval_split (all 112 held-out ones by default).")
    p.add_argument("--images_per_prompt", type=int, default=1, help="Seeds per prompt (paired across models; SEs are over prompts).")
    p.add_argument("--eval_steps", type=int, default=20, help="DDIM steps of the evaluation samples.")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: the idle cores).")
    p.add_argument("--device", default="cpu", help="Evaluation device (training uses what accelerate finds).")
    args = p.parse_args(argv)
    check_spec_parts([args.pixel_reward], {"--work_dir": args.work_dir, "--model": args.model})
    if args.pixel_reward == "toy":
        p.error("--pixel_reward toy: the demo trains on the toy reward already; name a pixel reward (brightness, saturation, ...).")
    if args.learning_rate is not None and not args.learning_rate > 0:
        p.error("--learning_rate must be > 0 (leave it out for the recipe's).")
    # Checked here, not by evaluate.py after the four trainings (minutes).
    from evaluate import MAX_IMAGES_PER_PROMPT
    from toyworld import world

    available = len(world.heldout_prompts() if args.eval_split == "heldout" else world.train_pair_prompts())
    if not 1 <= args.eval_prompts <= available:
        p.error(f"--eval_prompts must be between 1 and {available} (the {args.eval_split} prompts).")
    if not 1 <= args.images_per_prompt <= MAX_IMAGES_PER_PROMPT or args.eval_steps < 1:
        p.error(f"--images_per_prompt must be between 1 and {MAX_IMAGES_PER_PROMPT} and --eval_steps >= 1.")
    return args


def gains_table(summary: dict, runs: dict[str, str]) -> str:
    """Each fine-tune's paired gain over base on the reward it trained on, in standard errors, with the guards."""
    from evaluate import format_estimate

    def diff(entry):
        return format_estimate(entry["diff"], entry["diff_se"], signed=True)

    lines = ["| fine-tune | trained on | base | Δ trained reward (paired) | in SE | Δ toy/objects | Δ toy/relation | toy/clean | toy/size |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, reward in runs.items():
        row = summary[name]
        z = row[reward]["diff"] / row[reward]["diff_se"] if row[reward].get("diff_se") else float("nan")
        lines.append(f"| {name} | {reward} | {summary['base'][reward]['mean']:.3f} | {diff(row[reward])} | {z:+.1f} | "
                     f"{diff(row['toy/objects'])} | {diff(row['toy/relation'])} | {row['toy/clean']['mean']:.3f} | {row['toy/size']['mean']:.3f} |")
    return "\n".join(lines)


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
    lr = {} if args.learning_rate is None else {"learning_rate": args.learning_rate}
    runs = {}  # model name -> the reward it was trained on
    for reward in ("toy", args.pixel_reward):
        for variant, script, settings, steps, data_flag in (
            ("sft", "train_sft_diffusion_sharpening_sdxl.py", SFT, args.sft_steps, {"train_data_dir": str(data)}),
            ("rlhf", "train_rlhf_diffusion_sharpening_sdxl.py", RLHF, args.rlhf_steps, {"prompt_file": str(prompt_file)}),
        ):
            name = f"{variant}-{reward}"
            print(f"[demo] {variant.upper()}-sharpening on the {reward} reward: {steps} steps, n={settings['num_noisy_latents']} "
                  f"m={settings['trajectory_nums']} (log: {work / (name + '.log')})", flush=True)
            timings[name] = launch(script, {**base, **settings, **lr, **data_flag, "reward_model": reward, "max_train_steps": steps,
                                            "output_dir": str(work / name)}, work / f"{name}.log", threads)
            print(f"[demo]   done in {timings[name]:.0f} s", flush=True)
            runs[name] = reward

    print(f"[demo] evaluating base and the fine-tunes on {args.eval_prompts} {args.eval_split} prompts x {args.images_per_prompt} seed(s)", flush=True)
    import torch

    import evaluate

    torch.set_num_threads(threads)
    t = time.time()
    record = evaluate.main(evaluate.parse_args(
        ["--model", f"base={model}"] + [f"--model={name}={model},unet={work / name}" for name in runs] + [
            "--toy_split", args.eval_split, "--num_prompts", str(args.eval_prompts), "--images_per_prompt", str(args.images_per_prompt),
            "--steps", str(args.eval_steps), "--guidance_scale", str(COMMON["guidance_scale"]), "--reward_model", "toy",
            "--also_score", args.pixel_reward, "--device", args.device, "--output_dir", str(work / "eval"), "--seed", "1234",
        ]))
    gains = gains_table(record["summary"], runs)
    (work / "eval" / "gains.md").write_text(gains + "\n")
    print("\n" + gains)
    timings["evaluate"] = time.time() - t
    total = time.time() - started
    print("\n[demo] wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {total / 60:.1f} min")
    print(f"[demo] results: {work / 'eval' / 'gains.md'} (the gains above), {work / 'eval' / 'results.md'} (every metric), {work / 'eval' / 'results.json'} (every score),")
    print(f"[demo]          {work / 'eval' / 'compare.png'} (before/after: {'held-out' if args.eval_split == 'heldout' else 'training-pair'} prompts x models), grid_<model>.png;")
    print(f"[demo]          fine-tuned pipelines in {work}/{{sft,rlhf}}-{{toy,{args.pixel_reward}}}; training logs {work}/*.log")


if __name__ == "__main__":
    main(parse_args())
