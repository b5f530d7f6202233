"""Cheap deterministic rewards for training tests, loaded with --reward_plugin (also in subprocesses).

(Tests that need candidates to differ use the built-in `brightness` reward.)
`constant`: the same score for every image (all candidates tie: no preference).
`unavailable`: NaN for every image (a grader that never answers).
"""
from __future__ import annotations

import numpy as np
import torch

from reward import Reward, RewardOutput, register_reward


class _PixelReward(Reward):
    def __init__(self, name, fn):
        self.name, self.fn, self.calls, self.images_scored = name, fn, 0, 0

    def evaluate(self, images, prompts):
        assert len(images) == len(prompts)
        self.calls += 1
        self.images_scored += len(images)
        total = torch.tensor([self.fn(np.asarray(i, dtype=np.float32) / 255.0) for i in images], dtype=torch.float32)
        return RewardOutput(total=total, components={self.name: total})

    def counters(self):
        return {f"{self.name}/calls": self.calls}


@register_reward("constant")
def _constant(args=None, device="cpu", dtype=None):
    return _PixelReward("constant", lambda a: 0.5)


@register_reward("unavailable")
def _unavailable(args=None, device="cpu", dtype=None):
    return _PixelReward("unavailable", lambda a: float("nan"))
