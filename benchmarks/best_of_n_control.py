#!/usr/bin/env python
"""Controls for the reward-response benchmark that learn from FINISHED images instead of short trajectories.

Per prompt: sample n complete images with the current model (DDIM over the --infer_steps grid, CFG
--guidance_scale) and score them with the reward. Then, by --objective:
- `raft` (default): fine-tune on the best one with the ordinary diffusion loss (fresh noise at m timesteps drawn
  from the whole training range), as RAFT (arXiv 2304.06767) trains. No trajectories, no previews, no reference.
- `dpo`: online Diffusion-DPO (arXiv 2311.12908) between the best and the worst of the n images: both noised with
  the same m fresh noises and timesteps, Eq. 11's logits with the frozen reference (--beta_dpo, gamma 0). This is
  the image-level preference of the upstream code's Algorithm 2 without its trajectories.

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
from sharpening.losses import reward_dpo_logits, reward_dpo_loss  # noqa: E402
from sharpening.targets import fresh_rows, per_prompt_mean  # noqa: E402
from sharpening.trajectory import select  # noqa: E402
from sharpening.config import add_training_args, validate_training_args  # noqa: E402
from sharpening.training import StepResult, Trainer  # noqa: E402
from train_rlhf_diffusion_sharpening_sdxl import load_prompts, pair_errors, preference_logs  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser)
    add_reward_args(parser, argv)
    parser.add_argument("--prompt_file", default=None, help="Prompts: one per line (.txt) or JSON lines (.jsonl).")
    parser.add_argument("--objective", default="raft", choices=["raft", "dpo"], help="raft: diffusion loss on the best image; dpo: Diffusion-DPO best vs worst.")
    parser.add_argument("--beta_dpo", type=float, default=2500.0, help="beta of the dpo objective (= Diffusion-DPO's beta / 2, as in the RLHF script).")
    args = parser.parse_args(argv)
    if args.objective == "dpo" and args.num_noisy_latents < 2:
        parser.error("--objective dpo compares the best and the worst of n images: give --num_noisy_latents >= 2")
    validate_training_args(args)
    return args


def best_of_n_step(trainer: Trainer, batch: dict, generator: torch.Generator) -> StepResult:
    args, prompts = trainer.args, batch["captions"]
    n, size = args.num_noisy_latents, len(prompts)
    cond = trainer.conditioning(prompts, trainer.default_time_ids(size))
    images = trainer.rollout(cond.repeat(n), generator)  # candidate-major: row i * B + b
    decoded, finite = trainer.decode(images)
    scores = trainer.reward.evaluate(decoded, prompts * n).total.float()
    scores = torch.where(finite, scores, torch.full_like(scores, float("nan")))
    sel = select(scores, n)
    pick = lambda which: images[which.to(images.device) * size + torch.arange(size, device=images.device)]  # noqa: E731
    rows_w = fresh_rows(trainer.sampler, pick(sel.winner), trainer.num_steps, generator)
    train_cond = trainer.caption_dropout(cond, generator)
    finite_scores = scores[torch.isfinite(scores)]
    logs = {"reward/candidate_mean": finite_scores.mean().item() if finite_scores.numel() else float("nan"),
            "reward/winner": sel.winner_reward[sel.has_winner].mean().item() if sel.has_winner.any() else float("nan")}
    if args.objective == "raft":
        prediction = trainer.predict(trainer.policy(grad=True), rows_w, train_cond)
        losses = per_prompt_mean(trainer.row_errors(prediction, rows_w), rows_w.prompt, size)
        return StepResult(losses, sel.has_winner.to(losses.device), logs)

    # Diffusion-DPO: the loser's image under the winner's noise and timesteps, policy vs frozen reference.
    rows_l = rows_w.renoised(trainer.sampler, pick(sel.loser)[rows_w.prompt])
    policy_w, policy_l = pair_errors(trainer, trainer.policy(grad=True), rows_w, rows_l, train_cond)
    with torch.no_grad():
        ref_w, ref_l = pair_errors(trainer, trainer.reference, rows_w, rows_l, train_cond)
    zeros = torch.zeros(size, device=policy_w.device)
    logits = reward_dpo_logits(policy_w, ref_w, policy_l, ref_l, zeros, zeros, args.beta_dpo, 0.0)
    logs |= preference_logs(sel, logits, policy_w, ref_w, policy_l, ref_l)
    return StepResult(reward_dpo_loss(logits, sel.has_pair), sel.has_pair.to(logits.device), logs)


def main(args: argparse.Namespace) -> None:
    from sharpening.data import PromptDataset, collate_prompts

    trainer = Trainer(args, PromptDataset(load_prompts(args)), collate_prompts, needs_reference=args.objective == "dpo", variant=f"best-of-n control ({args.objective})")
    trainer.train(best_of_n_step)


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
