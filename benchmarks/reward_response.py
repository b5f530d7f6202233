#!/usr/bin/env python
"""Does a training objective raise the reward it is trained on? The reward-response benchmark.

For every reward and every training variant: fine-tune a shipped toy model (`--model`: the toy SDXL by default, or
`models/toy-sd3`, the flow-matching one) for `--steps` optimizer steps on the
toy world's TRAINING compositions (checkpoints every `--eval_every`), then sample every checkpoint and the base
model with the same seeds on training-pair prompts and report, paired against base:

  - Δ of the TRAINED reward ± paired SE, and the first checkpoint from which it stays above +3 SE (reward efficiency);
  - Δ of guard metrics that show reward hacking: the toy reward's objects, relation, clean and size components
    (a brightness reward that erases the objects raises brightness and sinks toy/objects; flooding the canvas with
    the caption's colours raises the toy reward itself and sinks toy/size).
  - with `standard-ft` among the variants, every other variant's Δ of the trained reward against it, paired on
    the same seeds: the bar beyond the base (does it beat ordinary fine-tuning on the same data?).

Rewards the base model does not already maximise: brightness, saturation, JPEG compressibility and
incompressibility (as DDPO defines them, in rewards/pixel.py) and the toy compositional reward.

Variants: `standard-ft` (the SFT script with n = m = 1: plain fine-tuning on the data, which never sees the reward),
`sft` and `rlhf` (each script's DEFAULTS), `sft-paper` / `rlhf-paper` (the paper-literal targets, Eq. 9 and Eq. 11
toward the starting noise, paths scored by Eq. 8's sum over the previews), and `best-of-n-control` (benchmarks/best_of_n_control.py: fine-tune on the best of n
FINISHED images, as RAFT does; it tells a weak objective from a reward the budget cannot move; its
`objective=dpo` and `objective=ddpo` are online Diffusion-DPO and the DDPO / Flow-GRPO policy gradient).
`--variant NAME=sft|rlhf|best_of_n[:FLAG=VALUE,...]` adds your own (`FLAG=true` switches an on/off flag on; a
`use_lora=true` run is evaluated through its LoRA adapters, a `use_ema=true` run on its averaged weights).

    python benchmarks/reward_response.py --quick                  # a few minutes on a CPU
    python benchmarks/reward_response.py                          # every reward and variant (about 85 min on 2 cores)
    python benchmarks/reward_response.py --rewards brightness --variant "sft-lr3e-5=sft:learning_rate=3e-5"
    python benchmarks/reward_response.py --rewards toy --variants --variant "sft-lora=sft:use_lora=true,lora_rank=8,learning_rate=1e-4"
    python benchmarks/reward_response.py --rewards brightness toy --variants sft rlhf --variant "ddpo=best_of_n:objective=ddpo"
    # train on the evaluated captions only (the first 56 training-pair captions) instead of all 320
    python benchmarks/reward_response.py --rewards toy --variants standard-ft sft --train_prompts 56
    # SFT variants trained on the base's own samples (data that do not maximise the reward) instead of the toy world's
    python evaluate.py --model base=models/toy-sdxl --toy_split train_pairs --seed 1000 --save_images --output_dir own
    python benchmarks/reward_response.py --rewards toy --variants standard-ft sft --set train_data_dir=own/images/base

Training itself varies from run to run (seed, thread count): the paired SE covers the evaluation's seeds only.
`--train_seeds K` trains every (reward, variant) K times with training seeds s, s+1, ... and reports the mean Δ over
the K runs with an SE that adds the variance between runs to the evaluation's: the two-way (run x prompt) random-
effects SE, sqrt(SE_eval^2 + sigma_run^2 / K) (`run_variance`).

Writes `reward_response.json`, `reward_response.md` and `reward_response.png` (Δ reward vs step) to --work_dir.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toyworld.recipe import BENCHMARK_REWARDS, COMMON, HARNESS_FLAGS, MODEL, RLHF, SFT, STANDARD_FT, check_evaluable, check_settable, check_spec_parts, check_trained_with, checkpoint_spec, cpu_threads, flag_value, launch, override_target, overrides_for, training_captions, write_data  # noqa: E402

SCRIPTS = {"sft": "train_sft_diffusion_sharpening.py", "rlhf": "train_rlhf_diffusion_sharpening.py",
           "best_of_n": "benchmarks/best_of_n_control.py"}
GUARDS = ("toy/objects", "toy/relation", "toy/clean", "toy/size")
CONTROL = "standard-ft"  # ordinary fine-tuning: every reward-seeking variant is also compared with it
VARIANTS = {
    "standard-ft": ("sft", STANDARD_FT),
    "sft-paper": ("sft", {**SFT, "sft_target": "noise", "path_reward": "sum"}),
    "sft": ("sft", SFT),
    "rlhf-paper": ("rlhf", {**RLHF, "dpo_target": "noise", "reward_margin_units": "raw"}),
    "rlhf": ("rlhf", RLHF),
    "best-of-n-control": ("best_of_n", RLHF),
}
QUICK = {"rewards": ["brightness", "jpeg_incompressibility"], "variants": ["standard-ft", "sft", "rlhf"], "steps": 20, "eval_every": 10,
         "eval_prompts": 32, "images_per_prompt": 2}


# The flags this benchmark sets for every run: the recipe harness's, and the reward each run trains on (--rewards).
OWNED_FLAGS = HARNESS_FLAGS | {"reward_model": "--rewards"}


def parse_variant(text: str) -> tuple[str, tuple[str, dict]]:
    """NAME=sft|rlhf|best_of_n[:FLAG=VALUE,...] -> (NAME, (script kind, recipe settings + flags))."""
    name, sep, rest = text.partition("=")
    kind, _, assignments = rest.partition(":")
    if not sep or not name or kind not in SCRIPTS:
        raise SystemExit(f"--variant {text!r}: expected NAME={'|'.join(SCRIPTS)}[:FLAG=VALUE,...]")
    settings = dict(SFT if kind == "sft" else RLHF)
    for item in filter(None, assignments.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--variant {text!r}: {item!r} is not FLAG=VALUE")
        check_settable(key.lstrip("-"), f"--variant {text!r}", OWNED_FLAGS)
        settings[key.lstrip("-")] = flag_value(value)
    return name, (kind, settings)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"A few minutes on a CPU: {QUICK}.")
    p.add_argument("--rewards", nargs="+", default=None, help=f"Rewards to train on (default: {' '.join(BENCHMARK_REWARDS)}).")
    p.add_argument("--variants", nargs="*", default=None, help=f"Built-in variants to run (default: {' '.join(VARIANTS)}).")
    p.add_argument("--variant", dest="extra_variants", action="append", default=[], metavar="NAME=sft|rlhf|best_of_n[:FLAG=VALUE,...]",
                   help="An extra variant: a script and the flags it gets on top of the toy recipe (repeatable).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="[VARIANT:]FLAG=VALUE",
                   help="Override a training flag for every run or for one variant (repeatable).")
    p.add_argument("--steps", type=int, default=60, help="Optimizer steps of every run (the toy recipe's budget).")
    p.add_argument("--eval_every", type=int, default=20, help="Checkpoint (and evaluate) every N steps.")
    p.add_argument("--eval_prompts", type=int, default=56, help="Training-pair prompts evaluated.")
    p.add_argument("--images_per_prompt", type=int, default=2)
    p.add_argument("--eval_steps", type=int, default=20, help="Sampling steps of the evaluation samples (DDIM for SDXL, flow-matching Euler for SD3 / FLUX).")
    p.add_argument("--train_seeds", type=int, default=1,
                   help="Training runs per (reward, variant), with training seeds s, s+1, ... (s: the recipe's or --set seed); "
                        "Δ is their mean, its SE adds the variance between runs to the evaluation's.")
    p.add_argument("--train_images", type=int, default=512, help="Images in the SFT imagefolder.")
    p.add_argument("--train_prompts", type=int, default=None,
                   help="Train on the first N training-pair captions (in the world's fixed shuffled order) only (default: all 320). With N = --eval_prompts every "
                        "evaluated caption is trained on about 60 x 8 / N times instead of 1.5 times in 60 steps.")
    p.add_argument("--model", default=str(MODEL), help="The toy model to fine-tune (models/toy-sdxl, models/toy-sd3 or models/toy-sd3-relations).")
    p.add_argument("--work_dir", default=str(ROOT / "output" / "reward_response"))
    p.add_argument("--jobs", type=int, default=1, help="Trainings run at once (threads are split between them).")
    p.add_argument("--threads", type=int, default=None, help="CPU threads in all (default: the idle cores).")
    p.add_argument("--device", default="cpu", help="Evaluation device; training uses what accelerate finds.")
    p.add_argument("--skip_training", action="store_true", help="Re-evaluate the runs already in --work_dir.")
    args = p.parse_args(argv)
    if args.quick:  # the quick values become the defaults: what the command line gives still wins
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    args.rewards = args.rewards or list(BENCHMARK_REWARDS)
    check_spec_parts(args.rewards, {"--work_dir": args.work_dir, "--model": args.model})
    names = args.variants if args.variants is not None else list(VARIANTS)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        p.error(f"--variants names unknown variants {sorted(unknown)}; built-in: {sorted(VARIANTS)}")
    args.runs = {name: VARIANTS[name] for name in names} | dict(parse_variant(v) for v in args.extra_variants)
    if not args.runs:
        p.error("no variant to run")
    unknown = {override_target(item) for item in args.overrides} - set(args.runs) - {""}
    if unknown:
        p.error(f"--set names unknown variants {sorted(unknown)}; variants: {sorted(args.runs)}")
    for name in args.runs:
        check_evaluable(args.runs[name][1] | overrides_for(name, args.overrides, OWNED_FLAGS))
    try:
        training_captions(args.train_prompts)
    except ValueError as error:
        p.error(f"--train_prompts: {error}")
    if args.train_seeds < 1:
        p.error("--train_seeds must be >= 1.")
    if args.steps % args.eval_every:
        p.error("--steps must be a multiple of --eval_every (so the last checkpoint is the final model).")
    return args


def run_label(reward: str, name: str, replica: int) -> str:
    """`reward/variant` for the first training run of a variant, `reward/variant.runJ` for its J-th repeat."""
    return f"{reward}/{name}" + (f".run{replica}" if replica else "")


def run_flags(args, work: Path, reward: str, name: str, data: Path, prompt_file: Path, replica: int = 0) -> dict:
    """The training flags of one (reward, variant) run: the toy recipe and its data, the variant's settings, then
    --set (so `--set train_data_dir=DIR` trains the SFT variants on your own imagefolder); the J-th repeat
    (`--train_seeds`) trains with the seed plus J."""
    kind, settings = args.runs[name]
    flags = {**COMMON, **settings, "reward_model": reward, "pretrained_model_name_or_path": args.model,
             "output_dir": str(work / run_label(reward, name, replica)), "max_train_steps": args.steps,
             "checkpointing_steps": args.eval_every}
    flags |= {"train_data_dir": str(data)} if kind == "sft" else {"prompt_file": str(prompt_file)}
    flags |= overrides_for(name, args.overrides, OWNED_FLAGS)
    flags["seed"] = int(flags["seed"]) + replica
    return flags


def all_runs(args, work: Path, data: Path, prompt_file: Path) -> list[tuple[str, str, dict]]:
    """(label, script, flags) of every (reward, variant, training seed) run."""
    return [(run_label(reward, name, j), SCRIPTS[args.runs[name][0]], run_flags(args, work, reward, name, data, prompt_file, j))
            for reward in args.rewards for name in args.runs for j in range(args.train_seeds)]


def train_all(args, work: Path, data: Path, prompt_file: Path) -> dict[str, float]:
    """Every (reward, variant) run, `--jobs` at a time; returns seconds per run."""
    total_threads = args.threads or cpu_threads()
    threads = max(1, total_threads // args.jobs)
    jobs = all_runs(args, work, data, prompt_file)

    def run(job):
        label, script, flags = job
        print(f"[reward_response] training {label} ({args.steps} steps)", flush=True)
        seconds = launch(script, flags, work / f"{label}.log", threads)
        print(f"[reward_response]   {label}: {seconds:.0f} s", flush=True)
        return label, round(seconds, 1)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return dict(pool.map(run, jobs))


def first_step_above(curve: list[dict], sigmas: float = 3.0) -> int | None:
    """The first checkpoint from which the paired Δ stays above `sigmas` standard errors at every later checkpoint, or
    None. (The first crossing alone would credit a run that passes once and falls back, e.g. +3 SE at step 20 and
    -5 SE at the end.)"""
    above = [p["diff_se"] > 0 and p["diff"] > sigmas * p["diff_se"] for p in curve]
    for i, point in enumerate(curve):
        if all(above[i:]):
            return point["step"]
    return None


def run_variance(deltas: np.ndarray) -> float:
    """What the training runs' own differences add to the variance of the mean of K runs' per-prompt Δs, `deltas`
    (K runs x P prompts, NaN where a prompt has no scored image): the run component sigma_run^2 / K of the two-way
    layout Δ[k, p] = mu + run_k + prompt_p + e[k, p]. The variance of the run means, var_k(mean_p Δ[k, p]), is
    sigma_run^2 + sigma_e^2 / P, and the evaluation's SE (over prompts of the run-averaged Δ) already carries
    sigma_e^2 / (K P); so the interaction mean square (sigma_e^2) over P comes off, and a negative estimate counts as 0.
    With both terms the SE is the two-way random-effects one, (MS_runs + MS_prompts - MS_interaction) / (K P)."""
    deltas = deltas[:, np.isfinite(deltas).all(axis=0)]
    runs, prompts = deltas.shape
    if runs < 2 or prompts < 2:
        return 0.0
    residual = deltas - deltas.mean(axis=1, keepdims=True) - deltas.mean(axis=0, keepdims=True) + deltas.mean()
    interaction = float((residual ** 2).sum()) / ((runs - 1) * (prompts - 1))
    return max(0.0, float(np.var(deltas.mean(axis=1), ddof=1)) - interaction / prompts) / runs


def pooled_entry(record: dict, labels: list[str], metric: str, against: list[str] | None = None) -> dict:
    """One metric of K training runs of a variant (evaluation labels `labels`), paired on the same seeds with the base
    or, given `against`, with the runs of another variant: Δ is the difference of the run means, and its SE adds each
    side's variance between runs (run_variance, where K > 1) to the evaluation's (SE over prompts of the per-prompt
    difference of the run averages). One run against the base: the evaluation's own paired entry."""
    from evaluate import mean_se, per_prompt, scored_by_all

    if len(labels) == 1 and against is None:
        return record["summary"][labels[0]][metric]
    k = record["images_per_prompt"]
    compared = [record["baseline"], *labels, *(against or [])]
    paired = dict(zip(compared, scored_by_all([np.array(record["scores"][m][metric], dtype=float) for m in compared])))

    def runs(models):  # (runs, prompts) of prompt means
        return np.stack([per_prompt(paired[m], k) for m in models])

    base = runs([record["baseline"]])[0]
    ours, theirs = runs(labels), runs(against) if against else None
    run_diffs = np.nanmean(ours - base, axis=1)
    diff, eval_se, _ = mean_se(np.nanmean(ours, axis=0) - (base if theirs is None else np.nanmean(theirs, axis=0)))
    between_runs = run_variance(ours - base) + (0.0 if theirs is None else run_variance(theirs - base))
    entry = {"diff": diff, "diff_se": math.sqrt(eval_se ** 2 + between_runs), "eval_se": eval_se}
    if against is None:
        entry |= {"mean": float(np.mean([record["summary"][label][metric]["mean"] for label in labels])),
                  "run_diffs": [float(d) for d in run_diffs], "run_sd": float(np.std(run_diffs, ddof=1))}
    return entry


def summarise(record: dict, args) -> dict:
    """{reward: {variant: {"curve": [{step, diff, diff_se}], "final": {metric: entry}, "steps_to_3se": ...}}}; with
    --train_seeds K every entry pools the K runs (pooled_entry)."""
    summary, checkpoints = record["summary"], list(range(args.eval_every, args.steps + 1, args.eval_every))
    out = {}
    for reward in args.rewards:
        out[reward] = {"base": {m: summary["base"][m] for m in (reward, *GUARDS)}}
        for name in args.runs:
            def labels(variant, step):
                return [f"{run_label(reward, variant, j)}@{step}" for j in range(args.train_seeds)]

            def at(step, metric):
                return pooled_entry(record, labels(name, step), metric)

            trained = {s: at(s, reward) for s in checkpoints}
            curve = [{"step": 0, "diff": 0.0, "diff_se": 0.0}] + [
                {"step": s, "diff": trained[s]["diff"], "diff_se": trained[s]["diff_se"]} for s in checkpoints]
            final = {m: at(args.steps, m) for m in (reward, *GUARDS)}
            out[reward][name] = {"curve": curve, "final": final, "steps_to_3se": first_step_above(curve[1:])}
            if CONTROL in args.runs and name != CONTROL:
                # The bar beyond the base: does it beat ordinary fine-tuning on the same data, at the same step?
                out[reward][name]["vs_control"] = pooled_entry(record, labels(name, args.steps), reward, labels(CONTROL, args.steps))
    return out


def _diff(entry: dict) -> str:
    from evaluate import format_estimate

    return format_estimate(entry.get("diff", float("nan")), entry.get("diff_se", float("nan")), signed=True)


def batch_sizes(args) -> dict[str, int]:
    """Each variant's batch per optimizer step as its runs train it (a --variant or --set may change the recipe's)."""
    sizes = {}
    for name in args.runs:
        flags = run_flags(args, Path("."), args.rewards[0], name, Path("."), Path("."))
        sizes[name] = int(flags["train_batch_size"]) * int(flags.get("gradient_accumulation_steps", 1))
    return sizes


def markdown(results: dict, args, record: dict | None = None) -> str:
    sizes = batch_sizes(args)
    batch = (f"batch {next(iter(sizes.values()))}" if len(set(sizes.values())) == 1
             else "batch " + ", ".join(f"{b} ({name})" for name, b in sizes.items()))
    pooled = ""
    if args.train_seeds > 1:
        pooled = (f"; mean of {args.train_seeds} training runs per variant (seeds s, s+1, ...), SE = sqrt(SE_eval^2 + sigma_runs^2 / "
                  f"{args.train_seeds}) (two-way, runs x prompts), each run's Δ of the trained reward in brackets")
        if args.train_seeds <= 3:  # tests/test_benchmarks_smoke.py simulates the 1 in 13
            pooled += (f". sigma_runs is estimated from {args.train_seeds - 1} degree(s) of freedom: where the runs' spread is large "
                       "against the evaluation's SE, runs that agree by chance make '+3 SE' far likelier than for 3 normal SEs (2 runs "
                       "whose spread is 5 times the evaluation's SE, no gain at all: about 1 in 13 passes); compare the runs' Δs and add runs")
    lines = [f"Reward response: {args.steps} optimizer steps of {batch} per run, model {Path(args.model).name}, training-pair prompts "
             f"({args.eval_prompts} x {args.images_per_prompt} seeds"
             + (f"; trained on the first {args.train_prompts} of them only" if args.train_prompts else "") + "); Δ = paired difference vs base ± paired SE over prompts"
             + pooled + ".", ""]
    names = list(args.runs)
    lines += ["Δ of the trained reward, in standard errors (final checkpoint; ✓ = more than +3 SE):", "",
              "| variant | " + " | ".join(args.rewards) + " |", "|---|" + "---|" * len(args.rewards)]
    for name in names:
        cells = []
        for reward in args.rewards:
            e = results[reward][name]["final"][reward]
            z = e["diff"] / e["diff_se"] if e.get("diff_se") else float("nan")
            cells.append(f"{z:+.1f}{' ✓' if z > 3 else ''}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    versus = CONTROL in args.runs and len(args.runs) > 1  # a column for the comparison with ordinary fine-tuning
    for reward in args.rewards:
        base = results[reward]["base"]
        lines += ["", f"**{reward}** (base {base[reward]['mean']:.3f}; toy/objects {base['toy/objects']['mean']:.3f}, "
                      f"relation {base['toy/relation']['mean']:.3f}, clean {base['toy/clean']['mean']:.3f}, size {base['toy/size']['mean']:.3f})", "",
                  f"| variant | Δ {reward} | steps to +3 SE | Δ toy/objects | Δ toy/relation | toy/clean | toy/size |"
                  + (f" Δ {reward} vs {CONTROL} |" if versus else ""), "|---|---|---|---|---|---|---|" + "---|" * versus]
        for name in names:
            r = results[reward][name]
            f = r["final"]
            steps = r["steps_to_3se"] if r["steps_to_3se"] is not None else f"> {args.steps}"
            runs = " [" + ", ".join(f"{d:+.3f}" for d in f[reward]["run_diffs"]) + "]" if "run_diffs" in f[reward] else ""
            control = (f" {_diff(r['vs_control'])} |" if "vs_control" in r else " — |") if versus else ""
            lines.append(f"| {name} | {_diff(f[reward])}{runs} | {steps} | {_diff(f['toy/objects'])} | {_diff(f['toy/relation'])} | "
                         f"{f['toy/clean']['mean']:.3f} | {f['toy/size']['mean']:.3f} |{control}")
    unscored = {(model, reward): metrics[reward]["unscored_images"] for model, metrics in (record or {}).get("summary", {}).items()
                for reward in args.rewards if metrics.get(reward, {}).get("unscored_images")}
    if unscored:  # a Δ over the images every compared model scored: say how many were left out, and where
        lines += ["", "Unscored images (left out of every paired Δ they belong to): "
                  + ", ".join(f"{model} {reward} {count}" for (model, reward), count in sorted(unscored.items())) + "."]
    return "\n".join(lines)


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.rewards), figsize=(4 * len(args.rewards), 3.4), squeeze=False)
    for ax, reward in zip(axes[0], args.rewards):
        for name in args.runs:
            curve = results[reward][name]["curve"]
            ax.errorbar([p["step"] for p in curve], [p["diff"] for p in curve], yerr=[p["diff_se"] for p in curve], label=name, capsize=2, marker="o", ms=3)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{reward} (base {results[reward]['base'][reward]['mean']:.3f})", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("Δ reward vs base (± paired SE)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> dict:
    import torch

    import evaluate

    started = time.time()
    work = Path(args.work_dir)
    data, prompt_file = write_data(work / "data", args.train_images, prompts=args.train_prompts)
    previous = work / "reward_response.json"
    if args.skip_training:  # a re-evaluation keeps the training times the runs were measured with
        for _, script, flags in all_runs(args, work, data, prompt_file):
            check_trained_with(script, flags)
        seconds = json.loads(previous.read_text()).get("train_seconds", {}) if previous.exists() else {}
    else:
        seconds = train_all(args, work, data, prompt_file)

    checkpoints = range(args.eval_every, args.steps + 1, args.eval_every)
    models = [f"base={args.model}"] + [
        f"{run_label(reward, name, j)}@{s}={args.model},"
        + checkpoint_spec(run_flags(args, work, reward, name, data, prompt_file, j), work / run_label(reward, name, j) / f"checkpoint-{s}", args.model)
        for reward in args.rewards for name in args.runs for j in range(args.train_seeds) for s in checkpoints
    ]
    torch.set_num_threads(args.threads or cpu_threads())
    record = evaluate.main(evaluate.parse_args(
        [f"--model={m}" for m in models]
        + [f"--also_score={r}" for r in args.rewards if r != "toy"]
        + ["--reward_model", "toy", "--toy_split", "train_pairs", "--num_prompts", str(args.eval_prompts),
           "--images_per_prompt", str(args.images_per_prompt), "--steps", str(args.eval_steps),
           "--guidance_scale", str(COMMON["guidance_scale"]), "--device", args.device, "--output_dir", str(work / "eval"),
           "--seed", "1234", "--grid_prompts", "8"]))
    results = summarise(record, args)
    text = markdown(results, args, record)
    (work / "reward_response.md").write_text(text + "\n")
    (work / "reward_response.json").write_text(json.dumps({
        "results": results, "train_seconds": seconds, "steps": args.steps, "eval_every": args.eval_every,
        "runs": {k: {"script": SCRIPTS[v[0]], "flags": v[1]} for k, v in args.runs.items()}, "overrides": args.overrides,
        "train_seeds": args.train_seeds, "train_prompts": args.train_prompts,
        "recipe": COMMON, "batch_per_step": batch_sizes(args), "skip_training": args.skip_training,
        "minutes": round((time.time() - started) / 60, 1)}, indent=2))
    plot(results, args, work / "reward_response.png")
    print("\n" + text + f"\n\n[reward_response] wrote {work / 'reward_response.md'}, .json, .png; "
          f"{(time.time() - started) / 60:.1f} min", flush=True)
    return results


if __name__ == "__main__":
    main(parse_args())
