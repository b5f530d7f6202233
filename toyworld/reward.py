"""The toy reward: how well an image matches its toy-world caption, in [0, 1]. Programmatic and
non-differentiable (numpy on decoded pixels), so it exercises the same path as a real reward model.

How an image is read:
1. Each pixel is assigned to its nearest palette colour or to the background (pixels far from every
   colour, e.g. blurry mixtures, are left unassigned).
2. Each object named in the caption is looked up by its colour: the largest 4-connected region of that
   colour. Its score is presence (area against a minimum area) x shape x size (only when the caption says
   small/large). Shape is a softmax over the three shapes' prototypes in (bounding-box fill ratio, share
   of the area in the top half, filled bounding-box corners): square (1, 0.5, 1), circle (pi/4, 0.5, 0),
   triangle (0.5, 0.25, 0.5: only the bottom corners). Corners separate small circles from squares,
   where pixelisation pushes a circle's fill ratio towards 1.
3. A composition also scores its relation from the two regions' centroids along the relation's axis; a placed
   single ("a red circle on the left") scores its place as that relation to the canvas centre.
4. Colours the caption does not name scale everything down ("clean").
5. "size" (a guard, not in the total): whether each object found is as big as the world draws objects, both
   sides of its bounding box within about 7..16 px (the world draws 9..14; blurred edges read 7..14). The total
   does not check extents (size words aside), so a canvas flooded with the named colours scores high on it;
   this component shows that.

total = clean * mean(object scores [, relation]). Components are reported separately (relation is NaN for
single objects without a place; size is NaN when no object was found). A caption outside the world's grammar gets NaN: the reward is unavailable, never guessed.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch

from rewards.base import Reward, RewardOutput

from . import world

_PALETTE = np.array([world.BACKGROUND, *world.COLOURS.values()], dtype=np.float32)
_NAMES = ["background", *world.COLOURS]
_MAX_DISTANCE = 90.0  # RGB distance beyond which a pixel belongs to no palette colour
_MIN_AREA = 20  # pixels: a small (9 px) triangle covers ~40
_SHAPE_PROTOTYPES = {"square": (1.0, 0.5, 1.0), "circle": (math.pi / 4, 0.5, 0.0), "triangle": (0.5, 0.25, 0.5)}
_FEATURE_WEIGHTS = (1.0, 1.0, 0.25)  # corners are single pixels: noisier than the area features
_SHAPE_TEMPERATURE = 0.01
# px: rendered small objects measure 7..10 px wide, large ones 11..14 (a large triangle's anti-aliased corners can
# fall below the colour threshold): split between the two, sharply, so that every correct render scores >= 0.98
_SIZE_SPLIT, _SIZE_SOFTNESS = 10.5, 0.125
_EXTENT_RANGE, _EXTENT_SOFTNESS = (5.5, 17.5), 0.5  # px: "size" is ~1 for bounding-box sides of 7..16 px (renders: 7..14)
COMPONENTS = ("objects", "relation", "clean", "size")


def label_pixels(image) -> np.ndarray:
    """(H, W) index into ["background", *colours], or -1 where a pixel is far from every palette colour."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    distance = np.linalg.norm(pixels[:, :, None, :] - _PALETTE, axis=-1)
    labels = distance.argmin(-1)
    labels[distance.min(-1) > _MAX_DISTANCE] = -1
    return labels


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (images are 32x32: a plain BFS is fast enough)."""
    seen = np.zeros_like(mask)
    best: list = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        region, queue = [start], deque([start])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    region.append((ny, nx))
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def shape_probabilities(region: np.ndarray) -> dict[str, float]:
    """Soft shape classification of a region (see the module docstring for the features)."""
    ys, xs = np.nonzero(region)
    if len(ys) < 4:
        return {s: 0.0 for s in _SHAPE_PROTOTYPES}
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    features = (
        len(ys) / ((bottom - top + 1) * (right - left + 1)),
        float(np.mean(ys < (top + bottom + 1) / 2)),
        float(np.mean([region[top, left], region[top, right], region[bottom, left], region[bottom, right]])),
    )

    def distance(prototype):
        return sum(w * (f - p) ** 2 for w, f, p in zip(_FEATURE_WEIGHTS, features, prototype))

    logits = {s: -distance(p) / _SHAPE_TEMPERATURE for s, p in _SHAPE_PROTOTYPES.items()}
    peak = max(logits.values())
    weights = {s: math.exp(v - peak) for s, v in logits.items()}
    total = sum(weights.values())
    return {s: w / total for s, w in weights.items()}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _relation_score(relation: str, a: np.ndarray, b: np.ndarray) -> float:
    """Soft check of `a <relation> b` from the regions' centroids."""
    return relation_from_centres(relation, np.argwhere(a).mean(0)[::-1], np.argwhere(b).mean(0)[::-1])


def relation_from_centres(relation: str, a, b) -> float:
    """`a <relation> b` from (x, y) centres (y grows downwards), along the relation's axis only: 0.5 at a 2 px lead,
    0.16 at equal positions, 0.97 at 6 px. (The world's own rule also asks the axis to dominate the sideways offset;
    this score does not, so a diagonal layout can satisfy two relations.)"""
    (ax, ay), (bx, by) = a, b
    along = {"to the left of": bx - ax, "to the right of": ax - bx, "above": by - ay, "below": ay - by}[relation]
    return _sigmoid((along - 2.0) / 1.2)


def relation_by_chance(samples: int = 100_000, seed: int = 0) -> float:
    """The mean relation score of a model that ignores the relation words: both objects of a composition at
    independent random places (sizes and margins as the world draws them; overlaps not modelled). Compare it with a
    model's toy/relation on images whose two objects are both present (presence gates the relation in
    `score_image`): near this, the model places its objects regardless of the relation words."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(samples):
        extents = rng.integers(world.PAIR_SIZES[0], world.PAIR_SIZES[1] + 1, size=2)
        a, b = (world._centre(rng, int(e)) for e in extents)
        total += relation_from_centres(world.RELATIONS[rng.integers(len(world.RELATIONS))], a, b)
    return total / samples


def score_image(image, caption: str) -> dict[str, float]:
    """{"total", "objects", "relation", "clean", "size"} for one image; NaN total when the caption is not parseable."""
    scene = world.parse_caption(caption)
    if scene is None:
        return {"total": float("nan"), "objects": float("nan"), "relation": float("nan"), "clean": float("nan"), "size": float("nan")}
    labels = label_pixels(image)
    regions, object_scores, extents = [], [], []
    for obj in scene.objects:
        region = largest_region(labels == _NAMES.index(obj.colour))
        area = int(region.sum())
        score = min(1.0, area / _MIN_AREA) * shape_probabilities(region)[obj.shape]
        if obj.size and area:
            xs = np.nonzero(region)[1]
            width = xs.max() - xs.min() + 1
            score *= _sigmoid(((_SIZE_SPLIT - width) if obj.size == "small" else (width - _SIZE_SPLIT)) / _SIZE_SOFTNESS)
        if area >= _MIN_AREA:
            extents.append(plausible_extent(region))
        regions.append(region)
        object_scores.append(score)
    parts = list(object_scores)
    relation = float("nan")
    if scene.relation:
        a, b = regions
        relation = _relation_score(scene.relation, a, b) if a.any() and b.any() else 0.0
        # Presence gates the relation: two specks in the right order are not a composition.
        relation *= min(1.0, a.sum() / _MIN_AREA) * min(1.0, b.sum() / _MIN_AREA)
        parts.append(relation)
    elif scene.place:  # a placed single: its relation to the canvas centre, gated by presence alike
        (a,) = regions
        relation = relation_from_centres(world.PLACES[scene.place], np.argwhere(a).mean(0)[::-1] + 0.5, world.CANVAS_CENTRE) if a.any() else 0.0
        relation *= min(1.0, a.sum() / _MIN_AREA)
        parts.append(relation)
    named = {_NAMES.index(o.colour) for o in scene.objects}
    coloured = labels > 0
    named_area = int(np.isin(labels, list(named)).sum())
    extra = int(coloured.sum()) - named_area
    # A few stray pixels of another colour (blur, edges) cost nothing; a whole extra object does.
    clean = 1.0 - min(1.0, max(0, extra - 4) / max(named_area, _MIN_AREA))
    total = clean * float(np.mean(parts))
    size = float(np.mean(extents)) if extents else float("nan")
    return {"total": total, "objects": float(np.mean(object_scores)), "relation": float(relation), "clean": clean, "size": size}


def plausible_extent(region: np.ndarray) -> float:
    """~1 when both sides of the region's bounding box lie in the world's range of object extents, ~0 far outside."""
    ys, xs = np.nonzero(region)
    low, high = _EXTENT_RANGE
    score = 1.0
    for side in (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1):
        score *= _sigmoid((side - low) / _EXTENT_SOFTNESS) * _sigmoid((high - side) / _EXTENT_SOFTNESS)
    return score


def canvas_factor(width: int, height: int) -> int | None:
    """k for a square image k times the toy canvas (the sizes the reward reads); None for any other size."""
    side = world.IMAGE_SIZE
    return width // side if width == height and width >= side and width % side == 0 else None


def on_canvas(image):
    """The image at the toy canvas's size, which every threshold (minimum area, size words, extents, the relation's
    lead) is measured in: a square image k times the canvas is averaged over k x k blocks (a 64 px render of a
    perfect image scored 0 on its size words as it was); any other size is refused."""
    side, factor = world.IMAGE_SIZE, canvas_factor(*image.size)
    if factor is None:
        raise ValueError(f"toy reward: it reads square images of {side} px (the toy world's canvas) or a multiple of it, got "
                         f"{image.size[0]}x{image.size[1]}; sample at --resolution {side} (or {2 * side}, {4 * side}, ...).")
    return image if factor == 1 else image.convert("RGB").reduce(factor)


class ToyReward(Reward):
    """`--reward_model toy`: the toy world's caption checker (see the module docstring)."""

    name = "toy"

    def __init__(self):
        self.calls = self.images_scored = self.unparseable = 0

    def evaluate(self, images, prompts):
        if len(images) != len(prompts):
            raise ValueError(f"toy reward: {len(images)} images but {len(prompts)} prompts")
        self.calls += 1
        self.images_scored += len(images)
        rows = [score_image(on_canvas(image), prompt) for image, prompt in zip(images, prompts)]
        self.unparseable += sum(math.isnan(r["total"]) for r in rows)
        total = torch.tensor([r["total"] for r in rows], dtype=torch.float32)
        components = {f"toy/{k}": torch.tensor([r[k] for r in rows], dtype=torch.float32) for k in COMPONENTS}
        return RewardOutput(total=total, components=components)

    def counters(self):
        return {"toy/calls": self.calls, "toy/images_scored": self.images_scored, "toy/unparseable_captions": self.unparseable}


def make_toy_reward(args=None, device="cpu", dtype=None):
    """Registry factory (args, device, dtype are not needed: the reward runs on the CPU in numpy)."""
    return ToyReward()
