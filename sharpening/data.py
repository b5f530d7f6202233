"""Datasets: image-text pairs (SFT) and prompts (RLHF), with the bad-row policy.

Bad rows (an unreadable image, a missing or empty caption) are never silently dropped and never replaced
by made-up data: the row is skipped, named in the log and counted; the next readable row by index takes
its place (and is seen twice that epoch) so batches keep their size; the trainer stops with a clear error once the share of
bad rows passes `--max_bad_fraction`.
"""
from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)


def load_hf_dataset(dataset_name: str | None, train_data_dir: str | None, dataset_config_name=None, cache_dir=None):
    """The train split of a hub dataset, a `save_to_disk` folder, or an imagefolder (metadata.jsonl/csv)."""
    import datasets

    if dataset_name and train_data_dir:
        raise ValueError("Give either --dataset_name or --train_data_dir, not both.")
    if not dataset_name and not train_data_dir:
        raise ValueError("Give the training data with --dataset_name (hub id or local folder) or --train_data_dir (imagefolder).")
    source = dataset_name or train_data_dir
    path = Path(source)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        data = datasets.load_from_disk(str(path))
    elif path.is_dir():
        data = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
    elif dataset_name and ("/" in dataset_name or not path.exists()):
        data = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    else:
        raise FileNotFoundError(f"Training data not found: {source!r} is neither a folder nor a dataset id.")
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ValueError(f"{source!r} has no 'train' split (splits: {sorted(data)}).")
        data = data["train"]
    return data


def require_columns(dataset, wanted: dict[str, str]) -> None:
    """wanted: flag -> column name. Raise listing the available columns (before any model is loaded)."""
    missing = {flag: col for flag, col in wanted.items() if col not in dataset.column_names}
    if missing:
        detail = ", ".join(f"{flag}={col!r}" for flag, col in missing.items())
        raise ValueError(f"Column(s) not in the dataset: {detail}. Available columns: {dataset.column_names}.")


def caption_text(value, rng: np.random.Generator) -> str | None:
    """A usable caption, or None for a bad row. Lists of captions pick one (as diffusers does)."""
    if isinstance(value, (list, tuple)):
        value = value[rng.integers(len(value))] if len(value) else None
    if value is None:
        return None
    if not isinstance(value, str):
        value = str(value)  # numbers etc. are kept, never dropped
    value = value.strip()
    return value or None


def _open_image(value) -> Image.Image:
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes"):
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        image = Image.open(value["path"])
    elif isinstance(value, (str, os.PathLike)):
        image = Image.open(value)
    else:
        raise ValueError(f"unsupported image value of type {type(value).__name__}")
    image.load()  # decode now, so a truncated file fails here and not in the middle of a batch
    # Upright as the camera meant it (an EXIF Orientation tag), as datasets' own Image decoder does.
    return ImageOps.exif_transpose(image).convert("RGB")


def _row_name(value, index: int) -> str:
    if isinstance(value, dict) and value.get("path"):
        return f"row {index} ({value['path']})"
    return f"row {index}"


class EpochSampler(torch.utils.data.Sampler):
    """A permutation per epoch from (seed, epoch) alone, so a resumed run sees exactly the same order."""

    def __init__(self, length: int, seed: int, shuffle: bool = True):
        self.length, self.seed, self.shuffle, self.epoch = length, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.length

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.length))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())


class ImageTextDataset(torch.utils.data.Dataset):
    """SDXL training transforms as in diffusers' train_text_to_image_sdxl.py (resize, center/random crop,
    random flip, [-1, 1]), and SDXL's original-size / crop micro-conditioning."""

    def __init__(self, hf_dataset, image_column: str, caption_column: str, resolution: int, center_crop: bool, random_flip: bool, seed: int):
        import datasets

        if isinstance(hf_dataset.features.get(image_column), datasets.Image):
            # Decode ourselves, so one corrupt file is a counted skip instead of a crash inside `datasets`.
            hf_dataset = hf_dataset.cast_column(image_column, datasets.Image(decode=False))
        self.data, self.image_column, self.caption_column = hf_dataset, image_column, caption_column
        self.resolution, self.center_crop, self.random_flip, self.seed, self.epoch = resolution, center_crop, random_flip, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.data)

    def _load(self, index: int, rng: np.random.Generator) -> dict:
        row = self.data[index]
        caption = caption_text(row[self.caption_column], rng)
        if caption is None:
            raise ValueError(f"missing or empty caption in column {self.caption_column!r}")
        image = _open_image(row[self.image_column])
        return {"caption": caption, **self._transform(image, rng)}

    def _transform(self, image: Image.Image, rng: np.random.Generator) -> dict:
        import torchvision.transforms.functional as TF

        original_size = (image.height, image.width)
        image = TF.resize(image, self.resolution, interpolation=TF.InterpolationMode.BILINEAR)
        if self.random_flip and rng.random() < 0.5:
            image = TF.hflip(image)  # before the crop, as diffusers does, so crop coords describe the flipped image
        if self.center_crop:
            top = max(0, round((image.height - self.resolution) / 2.0))
            left = max(0, round((image.width - self.resolution) / 2.0))
        else:
            top = int(rng.integers(0, image.height - self.resolution + 1))
            left = int(rng.integers(0, image.width - self.resolution + 1))
        image = TF.crop(image, top, left, self.resolution, self.resolution)
        pixels = TF.normalize(TF.to_tensor(image), [0.5], [0.5])
        return {"pixel_values": pixels, "original_size": original_size, "crop_top_left": (top, left)}

    def __getitem__(self, index: int) -> dict:
        bad: list[str] = []
        for offset in range(len(self.data)):
            i = (index + offset) % len(self.data)
            rng = np.random.default_rng([self.seed, self.epoch, i])
            try:
                return {**self._load(i, rng), "bad_rows": bad}
            except Exception as err:  # a corrupt file or caption is the row's fault; it is named and counted
                name = _row_name(self.data[i][self.image_column], i)
                logger.warning("Skipping bad training row %s: %s", name, err)
                bad.append(f"{name}: {err}")
        raise RuntimeError(f"No readable row in the whole dataset; bad rows: {bad[:5]} ...")


def collate_image_text(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(),
        "captions": [e["caption"] for e in examples],
        "original_sizes": [e["original_size"] for e in examples],
        "crops_top_left": [e["crop_top_left"] for e in examples],
        "bad_rows": [b for e in examples for b in e["bad_rows"]],
    }


PROMPT_FIELDS = ("prompt", "prompts", "text", "caption")


def _prompt_field(record: dict, preferred: str, where: str) -> str:
    """The first of `preferred`, prompt, text, caption present in a record (case-insensitive)."""
    by_lower = {str(k).lower(): k for k in record}
    for name in (preferred, *PROMPT_FIELDS):
        if name.lower() in by_lower:
            return by_lower[name.lower()]
    raise ValueError(f"{where}: no {preferred!r}, 'prompt', 'text' or 'caption' field in {sorted(record)}.")


def read_prompt_file(path: str | os.PathLike, field: str = "prompt") -> tuple[list[str], dict]:
    """Prompts from .txt (one per line), .jsonl (a `field`/prompt/text/caption value per line) or .csv/.tsv
    (that column; DrawBench's `Prompts` works). Blank prompts are skipped and counted; duplicates are kept
    (they are the user's weighting) and counted."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompt_file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(lines, delimiter="\t" if suffix == ".tsv" else ",")
        column = _prompt_field({name: None for name in reader.fieldnames or []}, field, str(path))
        values = [row[column] for row in reader]
    elif suffix == ".jsonl":
        values = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                values.append(None)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err}).") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {record!r}.")
            values.append(record[_prompt_field(record, field, f"{path}:{number}")])
    elif suffix in (".txt", ""):
        values = lines
    else:
        raise ValueError(f"--prompt_file {str(path)!r}: use .txt (one prompt per line), .jsonl or .csv/.tsv.")
    rng = np.random.default_rng(0)
    texts = [caption_text(v, rng) for v in values]
    prompts = [t for t in texts if t is not None]
    if not prompts:
        raise ValueError(f"--prompt_file {str(path)!r} holds no prompt.")
    stats = {"prompts": len(prompts), "blank_skipped": len(texts) - len(prompts), "duplicates": len(prompts) - len(set(prompts))}
    return prompts, stats


class PromptDataset(torch.utils.data.Dataset):
    def __init__(self, prompts: list[str]):
        self.prompts = prompts

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        return {"caption": self.prompts[index]}


def collate_prompts(examples: list[dict]) -> dict:
    return {"captions": [e["caption"] for e in examples], "bad_rows": []}


def prompts_from_dataset(hf_dataset, caption_column: str) -> tuple[list[str], dict]:
    """Captions of a dataset as RLHF prompts (images are never decoded). Rows without a usable caption
    are skipped and counted."""
    prompts, bad = [], 0
    rng = np.random.default_rng(0)
    for value in hf_dataset.select_columns([caption_column])[caption_column]:
        text = caption_text(value, rng)
        if text is None:
            bad += 1
        else:
            prompts.append(text)
    if not prompts:
        raise ValueError(f"Column {caption_column!r} holds no usable prompt.")
    return prompts, {"prompts": len(prompts), "blank_skipped": bad, "duplicates": len(prompts) - len(set(prompts))}
