#!/usr/bin/env python
"""Does a toy model's denoising loss use the words of its caption? A likelihood probe per noise level.

For fresh composition images of the training pairs (toyworld.world, a seed the base never saw), noise each image at
timestep t and compare the model's MSE (epsilon for the SDXL toy, velocity for the SD3 toy at sigma = t / 1000) under
its true caption with the MSE under a wrong caption:

    relation flipped   "a red circle to the left of a blue square" -> "... to the right of ..."
    colours swapped    "a red circle ... a blue square" -> "a blue circle ... a red square" (attribute binding)
    order swapped      "a red circle to the left of a blue square" -> "a blue square to the left of a red circle": the
                       same scene as the relation flip, reached by word order instead of the relation word (a model
                       that puts the first-named object on one side whatever the relation pays for this one only)
    unconditional      the classifier-free-guidance branch (SDXL: zero embeddings; SD3: "" encoded): what the caption
                       is worth at all

Each cell is the mean over images of MSE(wrong) - MSE(true) ± its standard error (positive: the true caption
explains the image better), and the same difference in x0 units: what the model's x0 prediction gains from the
right words. The epsilon loss counts an x0 error at t with weight SNR(t) = abar / (1 - abar) (1/120 at t = 950),
so x0 units divide by SNR(t); the velocity loss counts it with 1 / sigma^2, so they multiply by sigma^2. A model that ignores the relation words shows 0 in the first column at
every t; the x0 column shows where, along the chain, the caption decides anything. It also prints how far each wrong
caption's pooled text embedding lies from the true one's (a relation the text encoders do not separate cannot reach
the denoiser through the pooled path), and, as the yardstick for the x0 columns at high noise, what each edit costs
an ideal model at pure noise (its x0 prediction from noise alone is the mean latent of the caption's images).

    python benchmarks/caption_sensitivity.py                                  # models/toy-sdxl, 256 images (~1 min)
    python benchmarks/caption_sensitivity.py --model models/toy-sd3
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toyworld import world  # noqa: E402

FLIPPED = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}
PLACE_OF = {relation: place for place, relation in world.PLACES.items()}  # "to the left of" -> "on the left"
PLACE_FLIPPED = {place: PLACE_OF[FLIPPED[relation]] for place, relation in world.PLACES.items()}
TIMESTEPS = (100, 300, 500, 700, 850, 950)
RELATION_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


def relation_flipped(caption: str) -> str:
    scene = world.parse_caption(caption)
    return world.Scene(scene.objects, FLIPPED[scene.relation]).caption()


def place_flipped(caption: str) -> str:
    scene = world.parse_caption(caption)
    return world.Scene(scene.objects, place=PLACE_FLIPPED[scene.place]).caption()


def colours_swapped(caption: str) -> str:
    scene = world.parse_caption(caption)
    a, b = scene.objects
    return world.Scene((world.Obj(b.colour, a.shape, a.size), world.Obj(a.colour, b.shape, b.size)), scene.relation).caption()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "toy-sdxl"), help="A toy model folder (SDXL or SD3 architecture).")
    p.add_argument("--num_images", type=int, default=256)
    p.add_argument("--timesteps", type=int, nargs="+", default=list(TIMESTEPS))
    p.add_argument("--seed", type=int, default=12345, help="World images and noise (the shipped toys trained on images of seeds 100-102).")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--ideal_captions", type=int, default=16, help="Captions (and their edits) for the ideal model's reference.")
    p.add_argument("--ideal_images", type=int, default=64, help="Images per caption for the ideal reference (half fit, half score).")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--placed", action="store_true",
                   help="Probe placed single objects ('a red circle on the left', train_base --placed_fraction's curriculum) with the "
                        "place flipped, instead of compositions: whether the model learned the two-way half of a relation.")
    p.add_argument("--relations", nargs="+", choices=list(RELATION_WORDS), default=None,
                   help="Probe only compositions with these relations (left: 'to the left of', right: 'to the right of'; "
                        "default: all four). A model trained with "
                        "train_base --relation_skew learns 'the first-named object goes left / up' first; over all four "
                        "relations its order-swapped cost cancels (it is right for half of them and wrong for the rest), "
                        "so probe 'to the left of' above and 'to the right of' below apart.")
    p.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    if args.relations and args.placed:
        p.error("--relations selects compositions; --placed probes placed singles.")
    args.relations = [RELATION_WORDS[r] for r in args.relations] if args.relations else None
    return args


def probe_prompts(kind: str, relations=None) -> list[str]:
    """The captions the probe draws its images (and the ideal reference) from: training pairs or placed singles."""
    prompts = world.train_prompts(kind)
    return [c for c in prompts if world.parse_caption(c).relation in relations] if relations else prompts


def x0_per_loss_unit(sampler, t: int) -> float:
    """How many units of x0 MSE one unit of the training loss is at timestep t, the state held fixed: (1 - abar) per
    unit of v MSE on the DDIM grid (1 / SNR(t) for an epsilon model), sigma^2 for the flow sampler's velocity."""
    steps = torch.tensor([float(t)])
    if hasattr(sampler, "v_loss_weight"):
        return float((1 - sampler.alpha_bar(steps)[0]) * sampler.v_loss_weight(steps)[0])
    return float(sampler.sigma(steps)[0]) ** 2


@torch.no_grad()
def probe(args: argparse.Namespace) -> dict:
    from sharpening import sd3, sdxl
    from sharpening.families import FAMILIES
    from toyworld.train_base import to_pixels

    pipeline = json.loads((Path(args.model) / "model_index.json").read_text()).get("_class_name")
    if FAMILIES.get(pipeline) not in ("sdxl", "sd3"):
        raise SystemExit(f"{args.model} holds a {pipeline}; this probe reads toy models of the SDXL or SD3 architecture.")
    family = sdxl if FAMILIES[pipeline] == "sdxl" else sd3
    torch.set_num_threads(args.threads)
    parts = family.load(args.model)
    forward = family.forward(parts.denoiser.eval())
    sampler = family.make_sampler(parts, 20)  # its noising and regression target are the training objective's
    kind, edits = ("placed", PLACED_EDITS) if args.placed else ("pairs", WRONG)
    items = world.generate(probe_prompts(kind, args.relations), args.num_images, args.seed)
    captions = [c for _, c in items]
    n = len(items)
    x0 = family.encode_images(parts.vae, to_pixels([i for i, _ in items]), torch.Generator().manual_seed(args.seed))
    time_ids = family.time_ids([(world.IMAGE_SIZE,) * 2] * n, [(0, 0)] * n, (world.IMAGE_SIZE,) * 2)
    conds = {name: family.encode_prompts(parts, [edit(c) for c in captions], time_ids, "cpu")
             for name, edit in {"true": lambda c: c, **edits}.items()}
    conds["unconditional"] = family.unconditional(parts, conds["true"], "cpu")
    pooled = {name: float((conds[name].pooled - conds["true"].pooled).norm(dim=-1).mean())
              for name in (*edits, "unconditional")}
    print(f"pooled text embedding: norm {float(conds['true'].pooled.norm(dim=-1).mean()):.3f}, distance to the true caption's: "
          + ", ".join(f"{name} {d:.3f}" for name, d in pooled.items()), flush=True)
    ideal = ideal_gains(lambda images: family.encode_images(parts.vae, to_pixels(images), torch.Generator().manual_seed(args.seed)),
                        args.ideal_captions, args.ideal_images, args.seed, kind, edits, args.relations)
    print("an ideal model at pure noise (x0 units): " + ", ".join(f"{name} {c['mean']:+.4f} ± {c['se']:.4f}" for name, c in ideal.items()),
          flush=True)
    generator = torch.Generator().manual_seed(args.seed + 1)
    rows = []
    for t in args.timesteps:
        noise = torch.randn(x0.shape, generator=generator)
        steps = torch.full((n,), float(t))
        x_t, target, to_x0 = sampler.add_noise(x0, noise, steps), sampler.target(x0, noise, steps), x0_per_loss_unit(sampler, t)
        mse = {}
        for name, cond in conds.items():
            out = torch.cat([forward(x_t[i : i + args.batch_size], steps[i : i + args.batch_size],
                                     cond.select(torch.arange(i, min(i + args.batch_size, n)))) for i in range(0, n, args.batch_size)])
            mse[name] = ((out - target) ** 2).flatten(1).mean(1)
        row = {"t": t, "x0_per_loss_unit": to_x0, "mse_true": float(mse["true"].mean())}
        for name in (*edits, "unconditional"):
            diff = mse[name] - mse["true"]
            mean, se = float(diff.mean()), float(diff.std() / n**0.5)
            row[name] = {"mean": mean, "se": se, "x0_mean": mean * to_x0, "x0_se": se * to_x0}
        rows.append(row)
        print(format_row(row), flush=True)
    return {"model": args.model, "family": FAMILIES[pipeline], "num_images": n, "seed": args.seed, "relations": args.relations,
            "pooled_distance": pooled, "ideal_at_pure_noise": ideal,
            "rows": rows}


def order_swapped(caption: str) -> str:
    scene = world.parse_caption(caption)
    return world.Scene(scene.objects[::-1], scene.relation).caption()


WRONG = {"relation flipped": relation_flipped, "order swapped": order_swapped, "colours swapped": colours_swapped}
PLACED_EDITS = {"place flipped": place_flipped}


def ideal_gains(encode, num_captions: int, per_caption: int, seed: int, kind: str = "pairs", edits: dict = WRONG,
                relations=None) -> dict:
    """What each caption edit costs a model that predicts x0 perfectly, at pure noise (x0 units): its prediction from
    noise alone is the mean latent of the caption's images, so the cost of a wrong caption is E||x0 - mean(wrong)||^2 -
    E||x0 - mean(true)||^2 over the true caption's images ("no caption": the mean over all the captions' images).
    Means come from one half of `per_caption` images per caption, the errors from the other half (no in-sample bias)."""
    prompts = probe_prompts(kind, relations)
    stride = max(1, min(320, len(prompts)) // num_captions)  # 320: the stride the published composition figures used
    captions = [c for i, c in enumerate(prompts) if i % stride == 0][:num_captions]
    half = per_caption // 2

    def latents(caption, offset):
        return encode([i for i, _ in world.generate([caption], per_caption, seed + offset)])

    costs = {name: [] for name in (*edits, "unconditional")}
    fitted, held = {}, {}
    for k, caption in enumerate(captions):
        x = latents(caption, 1000 + k)
        fitted[caption], held[caption] = x[:half].mean(0), x[half:]
    overall = torch.stack(list(fitted.values())).mean(0)
    for k, caption in enumerate(captions):
        error = lambda mean: ((held[caption] - mean) ** 2).flatten(1).mean(1)  # noqa: E731
        right = error(fitted[caption])
        for name, edit in edits.items():
            costs[name].append(error(latents(edit(caption), 5000 + k)[:half].mean(0)) - right)
        costs["unconditional"].append(error(overall) - right)
    out = {}
    for name, values in costs.items():
        v = torch.cat(values)
        out[name] = {"mean": float(v.mean()), "se": float(v.std() / len(v) ** 0.5)}
    return out


def format_row(row: dict) -> str:
    cells = [f"t={row['t']:4d} (x0 units per loss unit {row['x0_per_loss_unit']:.3g}) mse {row['mse_true']:.4f}"]
    for name in [k for k in row if isinstance(row[k], dict)]:
        c = row[name]
        cells.append(f"{name} {c['mean']:+.5f} ± {c['se']:.5f} (x0 {c['x0_mean']:+.4f} ± {c['x0_se']:.4f})")
    return " | ".join(cells)


def main(argv=None) -> dict:
    args = parse_args(argv)
    what = "placed single-object" if args.placed else "composition" + (f" ({', '.join(args.relations)})" if args.relations else "")
    print(f"{args.model}: MSE(wrong caption) - MSE(true caption), {args.num_images} {what} images; loss units (x0 units)")
    result = probe(args)
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
