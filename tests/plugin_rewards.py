"""Cheap deterministic rewards for training tests, loaded with --reward_plugin (also in subprocesses).

(Tests that need candidates to differ use the built-in `brightness` reward.)
`constant`: the same score for every image (all candidates tie: no preference).
`unavailable`: NaN for every image (a grader that never answers).
`graded_brightness`: mean pixel value, with a credential flag `--grader_token` (a Secret, as a remote grader's key):
tests check that its value never reaches logs, trackers or outputs.
"""
from __future__ import annotations

import numpy as np
import torch

from reward import Reward, RewardOutput, Secret, register_reward


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


def _grader_flags(group):
    group.add_argument("--grader_token", type=Secret, default=None, help="Credential of the (pretend) grader.")


@register_reward("graded_brightness", flags=_grader_flags)
def _graded_brightness(args=None, device="cpu", dtype=None):
    return _PixelReward("graded_brightness", lambda a: float(a.mean()))
