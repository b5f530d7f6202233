#!/usr/bin/env python
"""A control for the reward-response benchmark: best-of-n on FINISHED images (as RAFT, arXiv 2304.06767, trains).

Per prompt: sample n complete images with the current model (DDIM over the --infer_steps grid, CFG
--guidance_scale), score them with the reward, and fine-tune on the best one with the ordinary diffusion loss
(fresh noise at m timesteps drawn from the whole training range). No trajectories, no previews, no reference.

It tells a weak objective from a hard reward or a small budget: if this control cannot move a reward at the
benchmark's budget, neither the budget nor the model allows it; if it can and sharpening cannot, the objective
is the limit. It takes the training scripts' flags (`--num_noisy_latents` = n, `--trajectory_nums` = m rows per
prompt) and runs on the same Trainer.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reward import add_reward_args  # noqa: E402
from sharpening.losses import per_sample_mse  # noqa: E402
from sharpening.targets import fresh_rows, per_prompt_mean  # noqa: E402
from sharpening.config import add_training_args, validate_training_args  # noqa: E402
from sharpening.training import StepResult, Trainer  # noqa: E402
from train_rlhf_diffusion_sharpening_sdxl import load_prompts  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser)
    add_reward_args(parser, argv)
    parser.add_argument("--prompt_file", default=None, help="Prompts: one per line (.txt) or JSON lines (.jsonl).")
    args = parser.parse_args(argv)
    validate_training_args(args)
    return args


def best_of_n_step(trainer: Trainer, batch: dict, generator: torch.Generator) -> StepResult:
    args, prompts = trainer.args, batch["captions"]
    n, size = args.num_noisy_latents, len(prompts)
    cond = trainer.conditioning(prompts, trainer.default_time_ids(size))
    images = trainer.rollout(cond.repeat(n), generator)  # candidate-major: row i * B + b
    decoded, finite = trainer.decode(images)
    scores = trainer.reward.evaluate(decoded, prompts * n).total.float()
    scores = torch.where(finite, scores, torch.full_like(scores, float("nan"))).view(n, size)
    has_winner = torch.isfinite(scores).any(0)
    winner = scores.nan_to_num(float("-inf")).argmax(0)
    best = images[winner.to(images.device) * size + torch.arange(size, device=images.device)]
    rows = fresh_rows(trainer.sampler, best, trainer.num_steps, generator)
    prediction = trainer.predict(trainer.policy(grad=True), rows, trainer.caption_dropout(cond, generator))
    losses = per_prompt_mean(per_sample_mse(prediction, rows.target(trainer.sampler)), rows.prompt, size)
    finite_scores = scores[torch.isfinite(scores)]
    logs = {"reward/candidate_mean": finite_scores.mean().item() if finite_scores.numel() else float("nan"),
            "reward/winner": scores.nan_to_num(float("-inf")).max(0).values[has_winner].mean().item() if has_winner.any() else float("nan")}
    return StepResult(losses, has_winner.to(losses.device), logs)


def main(args: argparse.Namespace) -> None:
    from sharpening.data import PromptDataset, collate_prompts

    trainer = Trainer(args, PromptDataset(load_prompts(args)), collate_prompts, needs_reference=False, variant="best-of-n control")
    trainer.train(best_of_n_step)


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
