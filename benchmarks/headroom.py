#!/usr/bin/env python
"""How much is there to prefer? The best-of-n headroom of each reward on one model.

Every preference method here (SFT- and RLHF-sharpening, RAFT, Diffusion-DPO) learns from the differences between
a prompt's candidates: one round of selection moves the model at most toward what the best of n samples already
does (repeated rounds can compound past it). This samples k
images per prompt (evaluate.py, paired seeds, the benchmark's sampler and CFG), scores them with every reward, and
reports per reward:

    mean               the model's mean reward
    best-of-j gain     E[max of j candidates] - mean, j = 2..k (exact over the k samples: the mean over prompts of the
                       expected maximum of a random j-subset), ± its standard error over prompts
    within/between SD  the standard deviation among a prompt's images (root of the mean variance), and that of the
                       prompts' true means (the prompt means' variance less the within-prompt noise they carry)
    tied pairs         share of candidate pairs of the same prompt whose scores are equal (no preference at all)

and, with the toy reward, the relation score of a model that ignores the relation words (toyworld/reward.py,
relation_by_chance) beside the model's relation on the images whose two objects are both found (the reward gates
the relation by presence, so the plain mean also counts missing objects): a model near it places the objects
regardless of the relation words.

A reward whose best-of-n gain is small next to the evaluation's paired SE gives little to learn from the model's
own samples at a small budget; one with a large gain that training does not move points at the objective, the
model or the budget.

    python benchmarks/headroom.py                         # toy SDXL, all 320 training-pair prompts x 8 seeds (~10 min, 2 cores)
    python benchmarks/headroom.py --model models/toy-sd3 --num_prompts 56
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toyworld.recipe import BENCHMARK_REWARDS  # noqa: E402


def expected_best_of(values: np.ndarray, j: int) -> float:
    """E[max of a uniformly random j-subset of `values`]: the i-th smallest (1-based) is the maximum of C(i-1, j-1)
    of the C(k, j) subsets."""
    v = np.sort(values)
    k = len(v)
    weights = np.array([math.comb(i - 1, j - 1) for i in range(1, k + 1)], dtype=float) / math.comb(k, j)
    return float(weights @ v)


def tied_pair_share(values: np.ndarray, tol: float = 1e-9) -> float:
    k = len(values)
    diffs = np.abs(values[:, None] - values[None, :])[np.triu_indices(k, 1)]
    return float((diffs <= tol).mean())


def headroom(scores: np.ndarray, per_prompt: int) -> dict:
    """scores: (P*k,) image scores, prompt-major. Prompts with a non-finite score are left out (counted)."""
    grid = scores.reshape(-1, per_prompt)
    keep = np.isfinite(grid).all(axis=1)
    grid = grid[keep]
    means = grid.mean(axis=1)
    within_var = grid.var(axis=1, ddof=1).mean()
    # The prompt means carry within-prompt noise of variance within_var / k: take it out of their variance.
    between_var = max(0.0, float(means.var(ddof=1) - within_var / per_prompt))
    row = {"prompts": int(len(grid)), "prompts_dropped": int((~keep).sum()), "mean": float(means.mean()),
           "between_prompt_sd": math.sqrt(between_var), "within_prompt_sd": float(math.sqrt(within_var)),
           "tied_pairs": float(np.mean([tied_pair_share(g) for g in grid])), "best_of": {}}
    for j in range(2, per_prompt + 1):
        gains = np.array([expected_best_of(g, j) for g in grid]) - means
        row["best_of"][j] = {"gain": float(gains.mean()), "se": float(gains.std(ddof=1) / math.sqrt(len(gains)))}
    return row


OBJECTS_FOUND = 0.9  # toy/objects at or above this: both objects present (presence gates the relation) and shaped right


def relation_against_chance(scores: dict, per_prompt: int) -> dict:
    """toy/relation beside what ignoring the relation words gives. The presence of both objects gates the relation,
    so the model's mean relation mixes layout with missing objects; on the images where both objects are found the
    relation reads layout alone, the same quantity as `relation_by_chance`. The mean is over those images; its SE is
    over prompts (`per_prompt` consecutive images each), since one prompt's images are not independent: the ratio
    estimator's linearised SE, sqrt(P / (P - 1) * sum_p (S_p - mean * n_p)^2) / sum_p n_p, with S_p and n_p the sum and
    count of prompt p's found images."""
    from toyworld.reward import relation_by_chance

    objects = np.array([np.nan if x is None else x for x in scores["toy/objects"]], dtype=float).reshape(-1, per_prompt)
    relation = np.array([np.nan if x is None else x for x in scores["toy/relation"]], dtype=float).reshape(-1, per_prompt)
    found = (objects >= OBJECTS_FOUND) & np.isfinite(relation)
    sums, counts = np.where(found, relation, 0.0).sum(axis=1), found.sum(axis=1)
    total, prompts = int(counts.sum()), int((counts > 0).sum())
    mean = float(sums.sum() / total) if total else float("nan")
    se = (math.sqrt(prompts / (prompts - 1) * float(((sums - mean * counts)[counts > 0] ** 2).sum())) / total
          if prompts > 1 else float("nan"))
    return {"by_chance": relation_by_chance(), "objects_found_images": total, "objects_found_prompts": prompts,
            "objects_found_mean": mean, "objects_found_se": se}


def markdown(rows: dict, per_prompt: int) -> str:
    js = sorted({j for j in (2, 3, 4, 6, 8, 16) if j <= per_prompt} | {per_prompt})
    lines = ["| reward | mean | within-prompt SD | between-prompt SD | tied pairs | " + " | ".join(f"best-of-{j} gain" for j in js) + " |",
             "|---|---|---|---|---|" + "---|" * len(js)]
    for name, r in rows.items():
        cells = [f"{r['best_of'][j]['gain']:+.4f} ± {r['best_of'][j]['se']:.4f}" for j in js]
        lines.append(f"| {name} | {r['mean']:.4f} | {r['within_prompt_sd']:.4f} | {r['between_prompt_sd']:.4f} | {r['tied_pairs']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "toy-sdxl"))
    p.add_argument("--rewards", nargs="+", default=list(BENCHMARK_REWARDS))
    p.add_argument("--toy_split", default="train_pairs", choices=["heldout", "train", "train_pairs", "single"],
                   help="Prompts (default: the benchmark's training pairs, where training would look for its signal).")
    p.add_argument("--num_prompts", type=int, default=None)
    p.add_argument("--images_per_prompt", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output_dir", default=str(ROOT / "output" / "headroom"))
    args = p.parse_args(argv)
    if args.images_per_prompt < 2:
        p.error("--images_per_prompt must be >= 2: headroom compares candidates of one prompt.")
    return args


def main(args: argparse.Namespace) -> dict:
    import evaluate

    out = Path(args.output_dir)
    argv = ["--model", f"model={args.model}", "--toy_split", args.toy_split, "--images_per_prompt", str(args.images_per_prompt),
            "--steps", str(args.steps), "--guidance_scale", str(args.guidance_scale), "--seed", str(args.seed),
            "--device", args.device, "--output_dir", str(out / "eval"), "--reward_model", args.rewards[0]]
    argv += [f"--also_score={r}" for r in args.rewards[1:]]
    if args.num_prompts is not None:
        argv += ["--num_prompts", str(args.num_prompts)]
    record = evaluate.main(evaluate.parse_args(argv))
    scores = record["scores"]["model"]
    names = list(args.rewards) + [k for k in scores if k.startswith("toy/")]
    rows = {name: headroom(np.array([np.nan if x is None else x for x in scores[name]], dtype=float), args.images_per_prompt)
            for name in names if name in scores}
    table = markdown(rows, args.images_per_prompt)
    note = (f"{args.model}: {len(record['prompts'])} {args.toy_split} prompts x {args.images_per_prompt} images, "
            f"{record['sampling']['sampler']} {args.steps} steps, CFG {args.guidance_scale}, seed {args.seed}. "
            "best-of-j gain = E[max of j of the prompt's images] - the prompt's mean, averaged over prompts ± SE.")
    if "toy/relation" in rows:
        rows["toy/relation"] |= relation_against_chance(scores, args.images_per_prompt)
        r = rows["toy/relation"]
        note += (f" toy/relation of two objects placed at random, ignoring the caption: {r['by_chance']:.3f}; the model's "
                 f"toy/relation on the {r['objects_found_images']} images whose objects are both found (toy/objects >= "
                 f"{OBJECTS_FOUND}; {r['objects_found_prompts']} prompts): {r['objects_found_mean']:.3f} ± "
                 f"{r['objects_found_se']:.3f} (SE over prompts).")
    (out / "headroom.md").write_text(table + "\n\n" + note + "\n")
    (out / "headroom.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print("\n" + table + "\n\n" + note + f"\n[headroom] wrote {out / 'headroom.md'}, {out / 'headroom.json'}", flush=True)
    return rows


if __name__ == "__main__":
    main(parse_args())
