"""Reward models for Diffusion-Sharpening behind one interface.

    reward = build_reward("clip:1.0,image_reward:0.5", args, device)
    out = reward.evaluate(images, prompts)      # out.total: float32 [N], NaN where no score could be had
    out.components                              # unweighted score of every component, same shape

Rewards:
  clip           open_clip cosine similarity of image and prompt (ViT-L-14 OpenAI weights by default)
  image_reward   ImageReward-v1.0 (BLIP ViT-L + BERT "med" cross-attention + MLP head), rebuilt on
                 transformers' BLIP classes and loaded from the official ImageReward.pt
  compositional  IterComp's three composition-aware reward models (same architecture), averaged
  pickscore      PickScore v1 (transformers CLIP ViT-H/14): logit_scale * cosine, as its model card scores
  hpsv2          Human Preference Score v2.1 (or v2.0): open_clip ViT-H-14 cosine with HPS's transform
  aesthetic      the LAION aesthetic predictor v2: an MLP on the normalised CLIP ViT-L/14 image embedding
  mllm           an OpenAI-compatible multimodal chat model grading with the rubric in mllm_template/
  brightness, saturation, jpeg_compressibility, jpeg_incompressibility
                 pixel statistics (the prompt is ignored), for checking that an objective moves a reward at all
  toy            the toy world's caption checker (toyworld/reward.py), for `make demo` and the benchmarks

Each reward registers its factory with its own flags and checks (`register_reward(name, flags=, validate=)`);
a `--reward_plugin FILE.py` does the same for rewards of its own. The training code only uses
`parse_reward_spec`, `add_reward_args`, `build_reward` and the `Reward` interface; nothing here knows about
training. As a command, this file scores a folder of images:

    python reward.py --reward_model clip --images DIR [--prompts FILE] [--json OUT]

The code lives in the rewards/ package, one job per module: rewards.base (the interface, `Secret`, the weighted
mix), rewards.registry (`register_reward`, the flags, `build_reward`), rewards.model_files (finding and reading
weights), rewards.clip (clip, hpsv2, pickscore, aesthetic), rewards.blip (image_reward, compositional),
rewards.mllm and rewards.pixel. This module imports them all, so importing `reward` registers every built-in;
it re-exports their public names and is the command line.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

# The built-in rewards register on import, in this order (that of their flag groups in --help). The registry's
# dicts (REWARDS, REWARD_FLAGS, REWARD_VALIDATORS) belong to rewards.registry: a test that swaps them patches that
# module, not this one.
from rewards.base import (CLIP_PIXEL_MEAN, CLIP_PIXEL_STD, SECRET_ARG_NAMES, ChunkedReward, Reward, RewardOutput,
                          Secret, WeightedSumReward, checked_evaluate, chunks)
from rewards.registry import (REWARD_FLAGS, REWARD_VALIDATORS, REWARDS, FlagsHook, RewardFactory, ValidateHook,
                              add_reward_args, build_reward, check_reward_flags_used, load_reward_plugins, parse_reward_spec,
                              register_lazy_reward, register_reward, validate_reward_args)
from rewards.model_files import load_state_dict_file, resolve_model_files
from rewards.clip import (AESTHETIC_LAYERS, HPS_CHECKPOINTS, AestheticMLP, AestheticReward, ClipReward,
                          OpenClipBackbone, PickScoreReward, build_aesthetic_reward,
                          build_clip_reward, build_hpsv2_reward, build_pickscore_reward, hps_preprocess,
                          open_clip_backbone)
from rewards.blip import (COMPOSITIONAL_FILES, IMAGE_REWARD_MEAN, IMAGE_REWARD_STD,
                          IMAGE_REWARD_TEXT_LENGTH, BlipReward, BlipRewardModel, blip_preprocess,
                          build_compositional_reward, build_image_reward, convert_image_reward_state_dict,
                          load_blip_reward_model, load_blip_tokenizer)
from rewards.mllm import (MLLM_ASPECTS, MLLM_SCORE_MAX, REPO_DIR, TEMPLATE_DIR, GradeParseError,
                          MllmRequestError, MllmReward, build_mllm_reward, encode_image_data_url, load_mllm_template,
                          parse_grade, retry_after_seconds, strip_userinfo)
from rewards.pixel import PIXEL_STATISTICS, PixelStatisticReward, brightness, jpeg_kilobytes, saturation
from sharpening.data import file_lines

__all__ = [
    # rewards.base
    "CLIP_PIXEL_MEAN", "CLIP_PIXEL_STD", "SECRET_ARG_NAMES", "ChunkedReward", "Reward", "RewardOutput", "Secret",
    "WeightedSumReward", "checked_evaluate",
    # rewards.registry
    "REWARDS", "REWARD_FLAGS", "REWARD_VALIDATORS", "FlagsHook", "RewardFactory", "ValidateHook", "add_reward_args",
    "build_reward", "load_reward_plugins", "parse_reward_spec", "register_lazy_reward", "register_reward",
    "validate_reward_args", "check_reward_flags_used",
    # rewards.model_files
    "load_state_dict_file", "resolve_model_files",
    # rewards.clip
    "AESTHETIC_LAYERS", "HPS_CHECKPOINTS", "AestheticMLP", "AestheticReward", "ClipReward", "OpenClipBackbone",
    "PickScoreReward", "build_aesthetic_reward", "build_clip_reward", "build_hpsv2_reward",
    "build_pickscore_reward", "hps_preprocess", "open_clip_backbone",
    # rewards.blip
    "COMPOSITIONAL_FILES", "IMAGE_REWARD_MEAN", "IMAGE_REWARD_STD", "IMAGE_REWARD_TEXT_LENGTH", "BlipReward",
    "BlipRewardModel", "blip_preprocess", "build_compositional_reward", "build_image_reward",
    "convert_image_reward_state_dict", "load_blip_reward_model", "load_blip_tokenizer",
    # rewards.mllm
    "MLLM_ASPECTS", "MLLM_SCORE_MAX", "REPO_DIR", "TEMPLATE_DIR", "GradeParseError", "MllmRequestError", "MllmReward",
    "build_mllm_reward", "encode_image_data_url", "load_mllm_template", "parse_grade", "retry_after_seconds",
    "strip_userinfo",
    # rewards.pixel
    "PIXEL_STATISTICS", "PixelStatisticReward", "brightness", "jpeg_kilobytes", "saturation",
    # the command line
    "IMAGE_SUFFIXES", "load_scoring_items", "score_items", "format_table", "write_json", "parse_args", "main",
]

# The toy world's programmatic reward: how well a demo image's colours, shapes and positions match its caption,
# in [0, 1]; NaN for captions outside the toy grammar. Runs on the CPU.
def _check_toy_args(args: argparse.Namespace) -> None:
    """Before any model loads: the toy reward reads its canvas or a multiple of it (toyworld.reward.on_canvas)."""
    from toyworld.reward import canvas_factor
    from toyworld.world import IMAGE_SIZE

    resolution = getattr(args, "resolution", None)  # training and evaluate take one; reward.py scores given images
    if resolution and canvas_factor(resolution, resolution) is None:
        raise ValueError(f"--reward_model toy reads the toy world's {IMAGE_SIZE} px canvas, or a multiple of it averaged "
                         f"down; --resolution {resolution} is neither: use {IMAGE_SIZE}.")


register_lazy_reward("toy", "toyworld.reward:make_toy_reward", validate=_check_toy_args)


# ============================================================================================= command
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_scoring_items(images_dir: Path, prompts_file: Path | None) -> list[tuple[Path, str]]:
    """(image path, prompt) pairs from --prompts (one line per image, sorted file names) or DIR/metadata.jsonl."""
    if not images_dir.is_dir():
        raise FileNotFoundError(f"--images {images_dir}: no such folder.")
    if prompts_file is not None:
        return _items_from_prompt_lines(images_dir, prompts_file)
    metadata = images_dir / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(f"no prompts: pass --prompts FILE (one line per image) or put metadata.jsonl with "
                                f"file_name and text columns in {images_dir}.")
    return _items_from_metadata(images_dir, metadata)


def _items_from_prompt_lines(images_dir: Path, prompts_file: Path) -> list[tuple[Path, str]]:
    if not prompts_file.is_file():
        raise FileNotFoundError(f"--prompts {prompts_file}: no such file.")
    if prompts_file.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv"):
        raise ValueError(f"--prompts {prompts_file}: give a text file, one prompt per line in sorted image-name order; for "
                         f"records, write {images_dir}/metadata.jsonl with file_name and text and leave --prompts out.")
    prompts = file_lines(prompts_file)  # as the training scripts read prompt files
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"--images {images_dir} holds no {'/'.join(IMAGE_SUFFIXES)} files.")
    if len(prompts) != len(images):
        raise ValueError(f"--prompts {prompts_file} has {len(prompts)} lines but {images_dir} has {len(images)} "
                         "images; give one prompt per image, in sorted file-name order.")
    blank = [number for number, prompt in enumerate(prompts, start=1) if not prompt.strip()]
    if blank:  # scored against "" the image would get a number that says nothing about its prompt
        raise ValueError(f"--prompts {prompts_file}: line(s) {blank[:10]} are blank; every image needs its prompt.")
    return list(zip(images, prompts))


def _items_from_metadata(images_dir: Path, metadata: Path) -> list[tuple[Path, str]]:
    items = []
    for number, line in enumerate(file_lines(metadata), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{metadata}:{number}: not valid JSON ({err.msg}).") from None
        missing = [column for column in ("file_name", "text") if not isinstance(row, dict) or column not in row]
        if missing:
            raise ValueError(f"{metadata}:{number}: missing column(s) {missing}; each line needs file_name and text.")
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise ValueError(f"{metadata}:{number}: text is {row['text']!r}; give each image its prompt as a non-empty string.")
        path = images_dir / str(row["file_name"])
        if not path.is_file():
            raise FileNotFoundError(f"{metadata}:{number}: image {row['file_name']!r} not found in {images_dir}.")
        items.append((path, row["text"]))
    if not items:
        raise ValueError(f"{metadata} lists no images.")
    return items


def score_items(reward: Reward, items: list[tuple[Path, str]], chunk: int) -> list[dict[str, Any]]:
    """One row per image: its file, prompt, the reward's components and total; an unreadable image is logged and
    scored NaN while the rest are scored."""
    rows: list[dict[str, Any]] = []
    for s in chunks(len(items), chunk):
        batch = items[s]
        images = [_read_image(path) for path, _ in batch]
        readable = [i for i, image in enumerate(images) if image is not None]
        out = checked_evaluate(reward, [images[i] for i in readable], [batch[i][1] for i in readable]) if readable else None
        scored = {i: k for k, i in enumerate(readable)}  # batch position -> position in the reward's output
        for i, (path, prompt) in enumerate(batch):
            row: dict[str, Any] = {"file": path.name, "prompt": prompt}
            if i in scored:
                row.update({name: float(values[scored[i]]) for name, values in out.components.items()})
                row["total"] = float(out.total[scored[i]])
            rows.append(row)
    # One set of columns for every row: an unreadable image's row (and a batch of only such) is NaN in each.
    columns = list(dict.fromkeys(key for row in rows for key in row if key not in ("file", "prompt", "total"))) + ["total"]
    return [{"file": row["file"], "prompt": row["prompt"], **{c: row.get(c, float("nan")) for c in columns}} for row in rows]


def _read_image(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # truncated, not an image, too many pixels
        print(f"[reward] skipped {path}: cannot read the image ({err}); scored NaN", file=sys.stderr, flush=True)
        return None


def _column_means(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, float]:
    means = {}
    for column in columns:
        finite = [row[column] for row in rows if math.isfinite(row[column])]
        means[column] = sum(finite) / len(finite) if finite else float("nan")
    return means


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = [key for key in rows[0] if key not in ("file", "prompt")]
    header = ["file", "prompt", *columns]
    body = [[row["file"], _clip_text(row["prompt"], 48), *(f"{row[c]:.4f}" for c in columns)] for row in rows]
    means = _column_means(rows, columns)
    nans = sum(1 for row in rows if not math.isfinite(row["total"]))
    body.append([f"mean ({len(rows)} images, {nans} NaN)", "", *(f"{means[c]:.4f}" for c in columns)])
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.insert(len(lines) - 1, lines[1])
    return "\n".join(lines)


def _clip_text(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_json(path: Path, reward: Reward, rows: list[dict[str, Any]]) -> None:
    columns = [key for key in rows[0] if key not in ("file", "prompt")]
    document = {
        "reward_model": reward.name,
        "mean": {key: _json_safe(value) for key, value in _column_means(rows, columns).items()},
        "counters": reward.counters(),
        "results": [{key: _json_safe(value) for key, value in row.items()} for row in rows],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a crash never leaves half a file


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Score a folder of images against their prompts with a reward model.")
    add_reward_args(parser, argv)
    g = parser.add_argument_group("scoring a folder")
    g.add_argument("--images", type=Path, required=True, help="Folder of images to score.")
    g.add_argument("--prompts", type=Path, default=None,
                   help="Text file with one prompt per image, in sorted file-name order. Without it, IMAGES/"
                        "metadata.jsonl (columns file_name, text) is used.")
    g.add_argument("--json", type=Path, default=None, help="Also write the results and means to this JSON file.")
    g.add_argument("--device", default=None, help="Torch device (default: cuda if available, else cpu).")
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="Weights dtype of local models.")
    g.add_argument("--chunk_size", type=int, default=64, help="Images loaded and scored per evaluate() call.")
    args = parser.parse_args(argv)
    try:
        validate_reward_args(args)
        check_reward_flags_used(args, [args.reward_model])
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.chunk_size < 1:
        parser.error("--chunk_size must be >= 1.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    items = load_scoring_items(args.images, args.prompts)  # before any model is loaded
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    reward = build_reward(args.reward_model, args, device=device, dtype=dtype)
    rows = score_items(reward, items, args.chunk_size)
    print(format_table(rows))
    counters = reward.counters()
    if counters:
        print("counters: " + ", ".join(f"{key}={value}" for key, value in sorted(counters.items())))
    if args.json is not None:
        write_json(args.json, reward, rows)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
