"""The toy world: a seeded generator of captioned 32x32 images of coloured shapes, and its prompt split.

Grammar (every caption is one of these, and `parse_caption` inverts `Scene.caption`):

    single:      "a [small|large] <colour> <shape>"                e.g. "a small red circle"
    placed:      "a <colour> <shape> <place>"                      e.g. "a red circle on the left"
    composition: "a <colour> <shape> <relation> a <colour> <shape>" e.g. "a red circle to the left of a blue square"

colours: red, green, blue, yellow; shapes: circle, square, triangle; relations: to the left of,
to the right of, above, below; places: on the left, on the right, at the top, at the bottom (the object lies that
way from the canvas centre, as a relation to it would require). The two objects of a composition have different
colours, so a reward can find each by colour alone.

Split: compositions are held out by their UNORDERED pair of objects: every caption built from a held-out
pair (both orders, all four relations) is an evaluation prompt that never appears in training, while each
single object (and each object inside other pairs) is seen in training. Held-out prompts therefore test
new combinations of known parts, which is where attribute binding and positions fail first.

Placed singles are an optional curriculum for base-model training (`toyworld.train_base --placed_fraction`): one
object and one position word, the two-way half of a composition's relation; no benchmark prompt uses them.
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
BACKGROUND = (250, 250, 250)
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (240, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (9, 10), "large": (13, 14)}  # extents in pixels at IMAGE_SIZE; no size word: 9..14
ANY_SIZE = (9, 14)  # below 9 px a circle is hard to tell from a square
PAIR_SIZES = (9, 12)  # two objects must fit side by side
RELATIONS = ("to the left of", "to the right of", "above", "below")
PLACES = {"on the left": "to the left of", "on the right": "to the right of", "at the top": "above", "at the bottom": "below"}
PLACE_GAP = 4.0  # px: a placed object's centre lies at least this far from the canvas centre, along the place's axis
CANVAS_CENTRE = np.array([IMAGE_SIZE / 2, IMAGE_SIZE / 2])
SPLIT_SEED = 0  # the split is part of the world's definition, not of an experiment
HELDOUT_FRACTION = 0.25
_SUPERSAMPLE = 4  # draw large and downsample: anti-aliased edges, closer to what a VAE can reproduce


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str | None = None  # "small", "large" or unspecified

    def phrase(self) -> str:
        words = [self.size] if self.size else []
        return " ".join(["a", *words, self.colour, self.shape])


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # one object, or two with a relation: objects[0] <relation> objects[1]
    relation: str | None = None
    place: str | None = None  # a single object's position on the canvas (a key of PLACES)

    def caption(self) -> str:
        if len(self.objects) == 1:
            return f"{self.objects[0].phrase()} {self.place}" if self.place else self.objects[0].phrase()
        return f"{self.objects[0].phrase()} {self.relation} {self.objects[1].phrase()}"


_OBJ = rf"a (?:(small|large) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_SINGLE = re.compile(rf"^{_OBJ}$")
_PLACED = re.compile(rf"^{_OBJ} ({'|'.join(PLACES)})$")
_PAIR = re.compile(rf"^{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}$")


def parse_caption(caption: str) -> Scene | None:
    """The scene a caption describes, or None when the caption is not in the world's grammar."""
    text = " ".join(caption.lower().strip().rstrip(".").split())
    if m := _SINGLE.match(text):
        return Scene((Obj(m[2], m[3], m[1]),))
    if m := _PLACED.match(text):
        return Scene((Obj(m[2], m[3], m[1]),), place=m[4])
    if m := _PAIR.match(text):
        a, b = Obj(m[2], m[3], m[1]), Obj(m[6], m[7], m[5])
        if a.colour == b.colour:
            return None  # not in the world: objects of a composition differ in colour
        return Scene((a, b), m[4])
    return None


# --------------------------------------------------------------------------------------------- prompts
def all_objects() -> list[Obj]:
    return [Obj(c, s) for c in COLOURS for s in SHAPES]


def object_pairs() -> list[tuple[Obj, Obj]]:
    """Unordered pairs of objects with different colours (54 of them)."""
    return [(a, b) for a, b in itertools.combinations(all_objects(), 2) if a.colour != b.colour]


def heldout_pairs() -> list[tuple[Obj, Obj]]:
    pairs = object_pairs()
    rng = np.random.default_rng(SPLIT_SEED)
    chosen = sorted(rng.choice(len(pairs), size=round(HELDOUT_FRACTION * len(pairs)), replace=False))
    return [pairs[i] for i in chosen]


def _pair_captions(pairs) -> list[str]:
    return [Scene((x, y), rel).caption() for a, b in pairs for x, y in ((a, b), (b, a)) for rel in RELATIONS]


def single_prompts() -> list[str]:
    return [Scene((Obj(o.colour, o.shape, size),)).caption() for o in all_objects() for size in (None, *SIZES)]


def placed_prompts() -> list[str]:
    return [Scene((o,), place=place).caption() for o in all_objects() for place in PLACES]


def train_prompts(kind: str = "all") -> list[str]:
    """Training captions: `single`, `pairs` (compositions of non-held-out pairs), `all` (both) or `placed` (the
    optional curriculum's placed singles, not part of `all`)."""
    if kind == "placed":
        return placed_prompts()
    held = set(heldout_pairs())
    pairs = _pair_captions([p for p in object_pairs() if p not in held])
    return {"single": single_prompts(), "pairs": pairs, "all": single_prompts() + pairs}[kind]


def heldout_prompts(limit: int | None = None) -> list[str]:
    """Evaluation captions: compositions of held-out pairs, in a fixed shuffled order (so the first `limit`
    cover many pairs and all relations)."""
    return _shuffled(_pair_captions(heldout_pairs()), SPLIT_SEED + 1, limit)


def train_pair_prompts(limit: int | None = None) -> list[str]:
    """The training-pair captions (`train_prompts("pairs")`) in a fixed shuffled order, the one the benchmarks train
    and score a subset of: in generation order the first 56, and the first 112, all hold a red object."""
    return _shuffled(train_prompts("pairs"), SPLIT_SEED + 2, limit)


def _shuffled(prompts: list[str], seed: int, limit: int | None) -> list[str]:
    order = np.random.default_rng(seed).permutation(len(prompts))
    prompts = [prompts[i] for i in order]
    return prompts[:limit] if limit else prompts


# --------------------------------------------------------------------------------------------- images
def _draw(draw: ImageDraw.ImageDraw, obj: Obj, cx: float, cy: float, extent: float) -> None:
    s = _SUPERSAMPLE
    x0, y0, x1, y1 = (cx - extent / 2) * s, (cy - extent / 2) * s, (cx + extent / 2) * s - 1, (cy + extent / 2) * s - 1
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # upright isosceles triangle: base and height both `extent`, so half its bounding box is filled
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _extent(obj: Obj, rng: np.random.Generator, default=ANY_SIZE) -> int:
    lo, hi = SIZES[obj.size] if obj.size else default
    return int(rng.integers(lo, hi + 1))


def _centre(rng: np.random.Generator, extent: int) -> np.ndarray:
    half = extent / 2
    return rng.uniform(half + 1, IMAGE_SIZE - half - 1, size=2)  # (x, y), fully inside with a 1 px margin


def _relation_holds(relation: str, a: np.ndarray, b: np.ndarray, gap: float) -> bool:
    """a <relation> b, with the relation's axis dominant and the objects `gap` px apart along it."""
    dx, dy = b - a  # image y grows downwards
    along, across = {"to the left of": (dx, dy), "to the right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= gap and abs(across) <= 0.5 * along


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """One image of `scene`; sizes (within the caption's size word) and positions come from `rng`."""
    big = Image.new("RGB", (IMAGE_SIZE * _SUPERSAMPLE,) * 2, BACKGROUND)
    draw = ImageDraw.Draw(big)
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        extent = _extent(obj, rng)
        centre = _centre(rng, extent)
        while scene.place and not _relation_holds(PLACES[scene.place], centre, CANVAS_CENTRE, gap=PLACE_GAP):
            centre = _centre(rng, extent)
        _draw(draw, obj, *centre, extent)
    else:
        a, b = scene.objects
        ea, eb = _extent(a, rng, PAIR_SIZES), _extent(b, rng, PAIR_SIZES)
        while True:  # rejection sampling: a handful of tries on average
            ca, cb = _centre(rng, ea), _centre(rng, eb)
            if _relation_holds(scene.relation, ca, cb, gap=(ea + eb) / 2 + 1):
                break
        _draw(draw, a, *ca, ea)
        _draw(draw, b, *cb, eb)
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def generate(prompts: list[str], count: int, seed: int) -> list[tuple[Image.Image, str]]:
    """`count` (image, caption) pairs, captions drawn uniformly from `prompts`; the same seed gives the same list."""
    rng = np.random.default_rng(seed)
    scenes = {p: parse_caption(p) for p in prompts}
    bad = [p for p, s in scenes.items() if s is None]
    if bad:
        raise ValueError(f"Not in the toy world's grammar: {bad[:3]}")
    out = []
    for index in rng.integers(0, len(prompts), size=count):
        caption = prompts[index]
        out.append((render(scenes[caption], rng), caption))
    return out


def write_imagefolder(folder: str | Path, prompts: list[str], count: int, seed: int) -> Path:
    """An imagefolder with metadata.jsonl (file_name, text), as the SFT script's --train_data_dir reads it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names, captions = [], []
    for i, (image, caption) in enumerate(generate(prompts, count, seed)):
        names.append(f"{i:05d}.png")
        captions.append(caption)
        image.save(folder / names[-1])
    write_captions(folder, names, captions)
    return folder


def write_captions(folder: Path, file_names: list[str], captions: list[str]) -> None:
    """The metadata.jsonl that makes a folder of images an imagefolder: one (file_name, text) row per image."""
    rows = [json.dumps({"file_name": name, "text": caption}) for name, caption in zip(file_names, captions, strict=True)]
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def write_prompt_file(path: str | Path, prompts: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(prompts) + "\n")
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write toy-world training data: an imagefolder and prompt files.")
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    out = Path(a.out_dir)
    write_imagefolder(out / "images", train_prompts(), a.count, a.seed)
    write_prompt_file(out / "train_prompts.txt", train_pair_prompts())
    write_prompt_file(out / "heldout_prompts.txt", heldout_prompts())
    print(out)
