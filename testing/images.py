"""A tiny image-text imagefolder for tests and the GPU check script (scripts/gpu_checks.sh), which runs where pytest
may not be installed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_image_folder(folder: Path, count: int = 8, size: int = 40, corrupt: tuple[int, ...] = ()) -> Path:
    """An imagefolder with metadata.jsonl: coloured squares with captions; `corrupt` rows get broken files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow"]
    rows = []
    for i in range(count):
        name = f"img_{i:03d}.png"
        if i in corrupt:
            (folder / name).write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
        else:
            array = rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
            Image.fromarray(array).save(folder / name)
        rows.append({"file_name": name, "text": f"a {colours[i % 4]} square number {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder
