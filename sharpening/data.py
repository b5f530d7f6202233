"""Datasets: image-text pairs (SFT) and prompts (RLHF), with the bad-row policy.

Bad rows (an unreadable image, a missing or empty caption) are never silently dropped and never replaced
by made-up data: the row is skipped, named in the log and counted; the next readable row by index takes
its place (and is seen twice that epoch) so batches keep their size; the trainer stops with a clear error once the share of
bad rows passes `--max_bad_fraction` (judged over enough rows to be evidence; see Trainer._count_rows).
"""
from __future__ import annotations

import json
import logging
import math
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
    flag = "--dataset_name" if dataset_name else "--train_data_dir"
    path = Path(source)
    if not path.is_dir() and not (dataset_name and ("/" in dataset_name or not path.exists())):
        raise FileNotFoundError(f"{flag} {source!r}: training data not found; it is neither a folder nor a dataset id.")
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            data = datasets.load_from_disk(str(path))
        elif path.is_dir() and train_data_dir:
            for metadata in (path / "metadata.jsonl", path / "metadata.csv"):
                if metadata.is_file() and not metadata.read_bytes().strip():
                    raise ValueError(f"{metadata} is empty: it needs a row per image with file_name and its caption")
            data = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
        else:
            # A hub id, or a local folder given as --dataset_name: often a copy of a hub dataset (data/train-*.parquet,
            # json, csv) rather than an imagefolder, so let datasets detect the format as it does for the hub.
            data = datasets.load_dataset(str(path) if path.is_dir() else dataset_name, dataset_config_name, cache_dir=cache_dir)
    except Exception as err:  # any loader failure: say which flag's data it was, keep datasets' own reason
        raise ValueError(f"{flag} {source!r} could not be loaded: {type(err).__name__}: {err}") from err
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ValueError(f"{flag} {source!r} has no 'train' split (splits: {sorted(data)}).")
        data = data["train"]
    return data


def require_columns(dataset, wanted: dict[str, str]) -> None:
    """wanted: flag -> column name. Raise listing the available columns (before any model is loaded)."""
    missing = {flag: col for flag, col in wanted.items() if col not in dataset.column_names}
    if missing:
        detail = ", ".join(f"{flag}={col!r}" for flag, col in missing.items())
        hint = ""
        if "--caption_column" in missing and set(dataset.column_names) <= {"image", "label"}:
            hint = (" An imagefolder gets its captions from a metadata.jsonl or metadata.csv beside the images, with a "
                    "file_name column and a caption column (`text`, or the one --caption_column names).")
        raise ValueError(f"Column(s) not in the dataset: {detail}. Available columns: {dataset.column_names}.{hint}")


def caption_text(value, rng: np.random.Generator) -> str | None:
    """A usable caption, or None for a bad row. Lists of captions pick one of their usable entries (as diffusers
    picks one). Numbers are kept as text; a value that is not text (a dict, bytes, a struct column) is an error
    naming the column, since its Python repr would be trained on as a caption."""
    if isinstance(value, (list, tuple)):
        usable = [text for text in (caption_text(v, rng) for v in value) if text is not None]
        return usable[rng.integers(len(usable))] if usable else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise CaptionTypeError(f"a caption of type {type(value).__name__} ({str(value)[:60]!r}): --caption_column must "
                               "name a column of text (or of lists of texts)")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a numeric CSV column reads as float: 1984 -> "1984", not "1984.0"
    value = str(value).strip()
    return value or None


class CaptionTypeError(TypeError):
    """The caption column does not hold text: a wrong --caption_column, not a bad row."""


def caption_variants(value, where: str) -> list[str]:
    """Every usable caption of a row (a list gives each of its entries), for prompts-only training; `where` names the
    row in the error for a value that is not text."""
    values = value if isinstance(value, (list, tuple)) else [value]
    rng = np.random.default_rng(0)  # only a list nested in the list picks from it
    try:
        return [text for text in (caption_text(v, rng) for v in values) if text is not None]
    except CaptionTypeError as err:
        raise ValueError(f"{where}: {err}.") from None


def _open_image(value) -> Image.Image:
    """Decode with datasets' own Image feature, which reads bytes, local paths and paths inside archives
    (an imagefolder's train.zip gives `zip://img.png::/.../train.zip`), as `datasets` would with decoding on."""
    import datasets

    if isinstance(value, (str, os.PathLike)):
        value = {"path": str(value), "bytes": None}
    elif isinstance(value, (bytes, bytearray)):  # a binary column (parquet written without datasets' Image feature)
        value = {"path": None, "bytes": bytes(value)}
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        image = datasets.Image().decode_example({"path": value.get("path"), "bytes": value.get("bytes")})
    else:
        raise ValueError(f"unsupported image value {type(value).__name__} {str(value)[:80]!r}")
    image.load()  # decode now, so a truncated file fails here and not in the middle of a batch
    # Upright as the camera meant it (an EXIF Orientation tag), as datasets' own Image decoder does.
    return to_rgb_on_white(ImageOps.exif_transpose(image))


def to_rgb_on_white(image: Image.Image) -> Image.Image:
    """8-bit RGB as a viewer shows the image: transparency (RGBA, LA, a palette's transparent index) over white, not
    the black its transparent pixels usually store; 16-bit and float greyscale scaled into 0-255, where convert("RGB")
    clips (a mid-grey 16-bit PNG became pure white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        if image.mode == "F" and values.max(initial=0) <= 1.0:
            top = 1.0
        image = Image.fromarray(np.clip(np.round(values / top * 255), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _row_name(value, index: int) -> str:
    if isinstance(value, dict) and value.get("path"):
        return f"row {index} ({value['path']})"
    return f"row {index}"


def subset_rows(total: int, wanted: int) -> list[int]:
    """--max_train_samples: `wanted` of `total` rows drawn at random, in their order, the same in every run and on
    every process (a fixed seed: --seed differs between processes when it is not given). The first rows would not be
    a sample of a dataset sorted by source, style or length."""
    if wanted >= total:
        return list(range(total))
    return sorted(np.random.default_rng(0).choice(total, wanted, replace=False).tolist())


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

        # Only the two columns read: another image column (a ControlNet condition, a mask) would be decoded on every
        # row, and a bad file there would fail the row's read outside the bad-row accounting.
        hf_dataset = hf_dataset.select_columns([image_column, caption_column])
        if isinstance(hf_dataset.features.get(image_column), datasets.Image):
            # Decode ourselves, so one corrupt file is a counted skip instead of a crash inside `datasets`.
            hf_dataset = hf_dataset.cast_column(image_column, datasets.Image(decode=False))
        self.data, self.image_column, self.caption_column = hf_dataset, image_column, caption_column
        self.resolution, self.center_crop, self.random_flip, self.seed, self.epoch = resolution, center_crop, random_flip, seed, 0
        # --max_bad_fraction: the flag's default here; the Trainer sets the flag's value (as it sets the seed).
        # It bounds the search for a readable stand-in row in __getitem__.
        self.max_bad_fraction = 0.01

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
        """Row `index`, or when it is bad the next readable row, with "bad_rows" naming row `index` alone.
        Only the sampled row is reported: every row is sampled once an epoch, so reporting the bad rows the
        search passed as well would count a block of b neighbouring bad rows b(b+1)/2 times."""
        n = len(self.data)
        # A run of bad rows longer than the whole epoch may hold under --max_bad_fraction stops the run anyway;
        # stop the search there, instead of scanning the dataset when e.g. --image_column names the wrong column.
        longest_allowed_run = max(1, math.floor(self.max_bad_fraction * n))
        errors: list[str] = []
        for offset in range(n):
            i = (index + offset) % n
            rng = np.random.default_rng([self.seed, self.epoch, i])
            try:
                return {**self._load(i, rng), "bad_rows": errors[:1]}
            except CaptionTypeError as err:  # the column's fault, not the row's
                raise ValueError(f"--caption_column {self.caption_column!r}, row {i}: {err}.") from None
            except Exception as err:  # a corrupt file or caption is the row's fault; it is named and counted
                errors.append(f"{_row_name(self.data[i][self.image_column], i)}: {err}")
                if offset == 0:
                    logger.warning("Skipping bad training %s", errors[0])
            if len(errors) > longest_allowed_run:
                break
        if len(errors) == n:
            raise RuntimeError(f"No readable row in the whole dataset (--image_column {self.image_column!r}, "
                               f"--caption_column {self.caption_column!r}); first bad rows: {errors[:3]}")
        raise RuntimeError(
            f"{len(errors)} consecutive rows from row {index} are unreadable, more than --max_bad_fraction="
            f"{self.max_bad_fraction} allows in the whole dataset of {n} rows: is --image_column {self.image_column!r} "
            f"the column of images (and --caption_column {self.caption_column!r} that of captions)? First bad rows: {errors[:3]}")


def collate_image_text(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(),
        "captions": [e["caption"] for e in examples],
        "original_sizes": [e["original_size"] for e in examples],
        "crops_top_left": [e["crop_top_left"] for e in examples],
        "bad_rows": [b for e in examples for b in e["bad_rows"]],
    }


PROMPT_FIELDS = ("prompt", "prompts", "text", "caption")
DATASET_CAPTION_COLUMN = "text"  # a dataset's caption column when --caption_column is not given (diffusers' scripts' default)


def file_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, without a byte-order mark (utf-8-sig: Windows editors write one, which would
    start the first line), or of a UTF-16 one that starts with its byte-order mark (PowerShell 5's `>` writes those),
    split on "\n" alone (a "\r" before it dropped). str.splitlines also splits on U+2028, U+0085, \x0c and others,
    which can sit inside a prompt and would make two prompts of one."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-16") if raw.startswith((b"\xff\xfe", b"\xfe\xff")) else raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8.") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line starts no new one
    return [line.removesuffix("\r") for line in lines]


def _find_field(names, wanted: str):
    """`wanted` among the names, exactly or else ignoring case (DrawBench's `Prompts`); None if absent."""
    names = list(names)
    if wanted in names:
        return wanted
    return next((name for name in names if str(name).lower() == wanted.lower()), None)


def _prompt_field(record: dict, where: str) -> str:
    """The first of prompt, prompts, text, caption present in a record (case-insensitive)."""
    for name in PROMPT_FIELDS:
        found = _find_field(record, name)
        if found is not None:
            return found
    raise ValueError(f"{where}: no 'prompt', 'prompts', 'text' or 'caption' field in {sorted(record)}; name it with --caption_column.")


PROMPT_FILE_HELP = ("Prompts: one per line (.txt), JSON lines (.jsonl) or a .csv/.tsv column; the field is --caption_column, "
                    "else the first of prompt, prompts, text, caption.")


def read_prompt_file(path: str | os.PathLike, field: str | None = None) -> tuple[list[str], dict]:
    """Prompts from .txt (one per line), .jsonl (a field per line) or .csv/.tsv (a column; DrawBench's `Prompts`
    works). `field` is --caption_column: None (not given) uses the first of prompt, prompts, text, caption; given,
    that field is required (records without it count as missing). Blank prompts
    are skipped and counted; duplicates are kept (they are the user's weighting) and counted."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompt_file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    required = field

    def missing_field(fields) -> ValueError:
        return ValueError(f"--caption_column {required!r} is not a field of --prompt_file {str(path)!r}; its fields: {sorted(fields)}.")

    if suffix in (".csv", ".tsv"):
        # newline="" and the file itself to the reader: csv keeps the line breaks inside a quoted multi-line prompt.
        with path.open(encoding="utf-8-sig", newline="") as file:
            reader = csv.DictReader(file, delimiter="\t" if suffix == ".tsv" else ",")
            header = reader.fieldnames or []
            if required is not None:
                column = _find_field(header, required)
                if column is None:
                    raise missing_field(header)
            else:
                column = _prompt_field({name: None for name in header}, str(path))
            values = [row[column] for row in reader]
    elif suffix == ".jsonl":
        values, fields_seen = [], set()
        for number, line in enumerate(file_lines(path), start=1):
            if not line.strip():
                values.append(None)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err}).") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {record!r}.")
            if required is not None:
                fields_seen.update(record)
                name = _find_field(record, required)
                values.append(None if name is None else record[name])  # None: counted with the blank prompts
            else:
                values.append(record[_prompt_field(record, f"{path}:{number}")])
        if required is not None and fields_seen and _find_field(fields_seen, required) is None:
            raise missing_field(fields_seen)  # in no record at all: a wrong name, not a few missing prompts
    elif suffix in (".txt", ""):
        if required is not None:
            raise ValueError(f"--caption_column {required!r}: --prompt_file {str(path)!r} is plain text, one prompt per line, with no "
                             "columns; drop the flag, or give a .jsonl or .csv/.tsv file.")
        values = file_lines(path)
    else:
        raise ValueError(f"--prompt_file {str(path)!r}: use .txt (one prompt per line), .jsonl or .csv/.tsv.")
    # each record's usable prompts: a list of them gives each (as a dataset's caption lists do)
    records = [caption_variants(value, f"--prompt_file {str(path)!r}, record {number}") for number, value in enumerate(values, start=1)]
    prompts = [text for texts in records for text in texts]
    if not prompts:
        raise ValueError(f"--prompt_file {str(path)!r} holds no prompt.")
    stats = {"prompts": len(prompts), "blank_skipped": sum(not texts for texts in records), "duplicates": len(prompts) - len(set(prompts))}
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
    """Captions of a dataset as RLHF prompts (images are never decoded): every usable caption, so a row with a list
    of captions (COCO's five) gives each of them. Rows without a usable caption are skipped and counted."""
    prompts, bad = [], 0
    for row, value in enumerate(hf_dataset.select_columns([caption_column])[caption_column]):
        texts = caption_variants(value, f"--caption_column {caption_column!r}, row {row}")
        bad += not texts
        prompts.extend(texts)
    if not prompts:
        raise ValueError(f"Column {caption_column!r} holds no usable prompt.")
    return prompts, {"prompts": len(prompts), "blank_skipped": bad, "duplicates": len(prompts) - len(set(prompts))}
