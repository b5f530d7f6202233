"""Finding and reading reward model weights: a local file or folder, or files of a Hugging Face Hub repo."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch


WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def resolve_model_files(source: str, filenames: Sequence[str], flag: str) -> list[Path]:
    """Files from a local folder, or downloaded from a Hugging Face Hub repo id (cached)."""
    path = Path(source).expanduser()
    if path.is_dir():
        missing = [name for name in filenames if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{flag} {source!r}: the folder lacks {', '.join(missing)} "
                                    f"(needs {', '.join(filenames)}).")
        return [path / name for name in filenames]
    if path.suffix.lower() in WEIGHT_FILE_SUFFIXES and not path.exists():  # "weights/aesthetic.pth" is a path, not a repo
        raise FileNotFoundError(f"{flag} {source!r}: no such file.")
    if path.exists() or not re.fullmatch(r"[\w.\-]+/[\w.\-]+", source):
        raise FileNotFoundError(f"{flag} {source!r} is neither a folder nor a Hugging Face Hub repo id.")
    # not a local folder but shaped like "org/name": try the hub (its cache first)
    from huggingface_hub import hf_hub_download

    files = []
    for name in filenames:
        try:
            files.append(Path(hf_hub_download(repo_id=source, filename=name)))
        except Exception as err:
            raise RuntimeError(f"{flag} {source!r}: no such local folder, and cannot get {name} from the Hugging "
                               f"Face Hub ({type(err).__name__}: {err}). Without network, download "
                               f"{', '.join(filenames)} elsewhere and pass the local folder.") from None
    return files


def load_state_dict_file(path: Path, flag: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint saved with torch.save (a state dict, or a dict with 'state_dict'), 'module.' removed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{flag}: cannot read {path} as a PyTorch state dict ({type(err).__name__}: {err}).") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{flag}: {path} does not hold a state dict of tensors.")
    return {key.removeprefix("module."): value for key, value in state.items()}


def single_model_file(source: str, filename: str, flag: str) -> Path:
    """A checkpoint given as the file itself, or as a folder / hub repo holding `filename`."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    return resolve_model_files(source, [filename], flag)[0]
