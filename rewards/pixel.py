"""Pixel-statistic rewards (the prompt is ignored): brightness, saturation, jpeg_compressibility and
jpeg_incompressibility."""
from __future__ import annotations

import argparse
import io
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .base import Reward, RewardOutput, check_batch, to_rgb
from .registry import register_reward


class PixelStatisticReward(Reward):
    """A reward computed from the pixels alone (the prompt is ignored): cheap, exact and easy to hack, which is
    what makes such rewards useful for checking that a training objective moves a reward at all (DDPO, arXiv
    2305.13301, trains on JPEG (in)compressibility for the same reason)."""

    def __init__(self, name: str, statistic: Callable[[Image.Image], float]) -> None:
        self.name, self._statistic = name, statistic
        self.images_scored = 0

    def evaluate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> RewardOutput:
        check_batch(images, prompts)
        self.images_scored += len(images)
        total = torch.tensor([self._statistic(image) for image in images], dtype=torch.float32)
        return RewardOutput(total=total, components={self.name: total})

    def counters(self) -> dict[str, int]:
        return {f"{self.name}/images_scored": self.images_scored}


def jpeg_kilobytes(image: Image.Image) -> float:
    """Size of the image as a quality-95 JPEG in kB (1000 bytes), as DDPO's compressibility rewards measure it."""
    buffer = io.BytesIO()
    to_rgb(image).save(buffer, format="JPEG", quality=95)
    return buffer.tell() / 1000


def brightness(image: Image.Image) -> float:
    """Mean luma (ITU-R 601, PIL's "L" conversion) in [0, 1]."""
    return float(np.asarray(to_rgb(image).convert("L"), dtype=np.float32).mean() / 255)


def saturation(image: Image.Image) -> float:
    """Mean HSV saturation in [0, 1]."""
    return float(np.asarray(to_rgb(image).convert("HSV"), dtype=np.float32)[..., 1].mean() / 255)


PIXEL_STATISTICS: dict[str, Callable[[Image.Image], float]] = {
    "brightness": brightness,
    "saturation": saturation,
    "jpeg_compressibility": lambda image: -jpeg_kilobytes(image),  # DDPO: minus the JPEG size in kB
    "jpeg_incompressibility": jpeg_kilobytes,  # DDPO: the JPEG size in kB
}


def _register_pixel_statistic(name: str) -> None:
    def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Reward:
        return PixelStatisticReward(name, PIXEL_STATISTICS[name])

    build.__qualname__ = f"build_{name}_reward"
    register_reward(name)(build)


for _name in PIXEL_STATISTICS:
    _register_pixel_statistic(_name)
