#!/usr/bin/env python
"""RLHF Diffusion-Sharpening for SDXL (arXiv 2502.12146, Algorithm 2, reward-modulated DPO).

Prompts only. For each prompt c: generate x0 with the CURRENT model (DDIM, classifier-free guidance, no
grad), noise it with n fresh noises at a timestep t on the DDIM grid, run m DDIM steps from each, score the
path (Eq. 8), take the best (w) and worst (l) trajectory, and minimise Eq. 11:

    -log sigmoid( -beta * (Delta_w - Delta_l) - gamma * (R_w - R_l) ),
    Delta = mean over the trained states of ||eps_theta - eps||^2 - ||eps_ref - eps||^2

with the frozen base UNet as reference (LoRA: the same UNet with adapters disabled). By default
(`--dpo_target shared`) both Deltas are taken on the states of all n trajectories, with eps the noise that maps
the state to the winner's (w) or the loser's (l) end image: one set of states, two outcomes. Eq. 11's literal
target (`--dpo_target noise`: each path's starting noise, i.e. both back toward the one generated x0) moves the
reward the wrong way: see sharpening/targets.py.
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from reward import add_reward_args
from sharpening.data import DATASET_CAPTION_COLUMN, PROMPT_FILE_HELP, PromptDataset, collate_prompts, load_hf_dataset, prompts_from_dataset, read_prompt_file, require_columns, subset_rows
from sharpening.losses import reward_dpo_logits, reward_dpo_loss
from sharpening.targets import DPO_TARGETS, Rows, dpo_rows, per_prompt_mean
from sharpening.config import add_training_args, refuse_unused_flags, validate_training_args
from sharpening.training import PooledMean, StepResult, Trainer
from sharpening.trajectory import Selection

logger = logging.getLogger("sharpening")


def parse_args(argv: list[str] | None = None, description: str = __doc__) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser)
    add_reward_args(parser, argv)
    parser.add_argument("--prompt_file", default=None, help=PROMPT_FILE_HELP)
    parser.add_argument("--beta_dpo", type=float, default=2500.0, help="beta of Eq. 11 (= Diffusion-DPO's beta / 2).")
    parser.add_argument("--reward_margin_scale", type=float, default=1.0, help="gamma of Eq. 11; 0 gives Diffusion-DPO on trajectories.")
    parser.add_argument(
        "--reward_margin_units", default="spread", choices=["spread", "raw"],
        help="Units of the reward gap R_w - R_l inside Eq. 11. raw: the reward's own (as written; a CLIP cosine gap is "
             "~100x smaller than an ImageReward gap, and a summed path gap grows with m). spread: divided by the "
             "pooled within-prompt standard deviation of the path rewards over every prompt explored so far (all "
             "processes; checkpointed), so gamma means the same for every reward and every m.")
    parser.add_argument(
        "--dpo_target", default="shared", choices=sorted(DPO_TARGETS),
        help="What the DPO errors regress to. " + " ".join(f"{k}: {v}" for k, v in DPO_TARGETS.items()))
    args = parser.parse_args(argv)
    if not args.prompt_file and not (args.dataset_name or args.train_data_dir):
        parser.error("give prompts with --prompt_file or a dataset (--dataset_name / --train_data_dir; its captions: --caption_column, default text)")
    if args.prompt_file:
        refuse_unused_flags(parser, args, ["dataset_name", "train_data_dir", "dataset_config_name"],
                            "the prompts come from --prompt_file, and a dataset's captions would not be read; give one source")
    refuse_unused_flags(parser, args, ["image_column", "max_bad_fraction"],
                        "RLHF trains on captions and generates its own images, so no image is read (or found unreadable)")
    if args.num_noisy_latents < 2:
        parser.error("--num_noisy_latents must be >= 2 in RLHF: the loss compares the best and the worst trajectory")
    if not args.beta_dpo > 0 or args.reward_margin_scale < 0:
        parser.error("--beta_dpo must be > 0 and --reward_margin_scale >= 0: a negative one trains away from the preferred "
                     "trajectories, beta 0 trains nothing.")
    if args.dpo_target != "fresh":
        refuse_unused_flags(parser, args, ["weighting_scheme", "logit_mean", "logit_std"],
                            f"they shape freshly drawn noise levels (--dpo_target fresh, on SD3 and FLUX); --dpo_target {args.dpo_target} "
                            "trains on the states its paths visit")
    validate_training_args(parser, args)
    for flag in ("center_crop", "random_flip"):
        if getattr(args, flag):
            logger.warning("--%s has no effect in RLHF: it trains on prompts and generates its own images.", flag)
    return args


def pair_errors(trainer: Trainer, model, rows_w: Rows, rows_l: Rows, cond) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) errors of `model` on the winner's and the loser's rows, each averaged over its prompt's rows. One model
    call: on both sets of rows, or once when the two sides share their states and differ only in the target."""
    shared = rows_l.states is rows_w.states
    prediction = trainer.predict(model, rows_w if shared else Rows.cat([rows_w, rows_l]), cond)
    prediction_w, prediction_l = (prediction, prediction) if shared else prediction.split([len(rows_w.prompt), len(rows_l.prompt)])
    batch = len(cond)
    return tuple(
        per_prompt_mean(trainer.row_errors(pred, rows), rows.prompt, batch)
        for pred, rows in ((prediction_w, rows_w), (prediction_l, rows_l))
    )


def rlhf_step(trainer: Trainer, batch: dict, generator: torch.Generator) -> StepResult:
    """Algorithm 2 for one micro-batch of B prompts."""
    args = trainer.args
    prompts = batch["captions"]
    time_ids = trainer.default_time_ids(len(prompts))
    cond = trainer.conditioning(prompts, time_ids)

    # On-policy data: x0 from the current model, then n fresh noises and exploration (Eq. 8).
    x0 = trainer.rollout(cond, generator)
    candidates = trainer.explore_candidates(x0, cond, prompts, generator)
    sel = candidates.selection

    # Policy and reference errors on the winner's and the loser's rows: one grad call, one no-grad call.
    rows_w, rows_l = dpo_rows(args.dpo_target, trainer.sampler, candidates, generator)
    train_cond = trainer.caption_dropout(cond, generator)
    policy_w, policy_l = pair_errors(trainer, trainer.policy(grad=True), rows_w, rows_l, train_cond)
    with torch.no_grad():
        ref_w, ref_l = pair_errors(trainer, trainer.reference, rows_w, rows_l, train_cond)

    valid = sel.has_pair  # prompts whose rewards tie or are NaN are masked out of the loss
    gap_unit = trainer.pooled_reward_spread(candidates.path_rewards) if args.reward_margin_units == "spread" else 1.0
    logits = reward_dpo_logits(
        policy_w, ref_w, policy_l, ref_l,
        (sel.winner_reward / gap_unit).to(policy_w.device), (sel.loser_reward / gap_unit).to(policy_w.device),
        args.beta_dpo, args.reward_margin_scale,
    )

    logs = trainer.exploration_logs(candidates) | {"timestep": candidates.exploration.timesteps[0].float().mean().item()}
    logs |= preference_logs(sel, logits, policy_w, ref_w, policy_l, ref_l)
    if valid.any():
        logs["reward/gap_unit"] = gap_unit
    return StepResult(reward_dpo_loss(logits, valid), valid, logs)


def preference_logs(sel: Selection, logits, policy_w, ref_w, policy_l, ref_l) -> dict:
    """What a DPO step logs over the prompts with a preference (sel.has_pair), as means pooled over the update."""
    valid = sel.has_pair
    logs = {"skipped_prompts": float((~valid).sum())}
    if valid.any():
        v = valid.to(logits.device)
        # Implicit reward accuracy: the policy prefers w over l more than the reference does.
        logs["implicit_accuracy"] = PooledMean.of(((policy_w - ref_w) < (policy_l - ref_l))[v])
        logs["dpo_logits"] = PooledMean.of(logits[v])
        logs["reward/winner_minus_loser"] = PooledMean.of((sel.winner_reward - sel.loser_reward)[valid])
    return logs


def load_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt_file:
        prompts, stats = read_prompt_file(args.prompt_file, args.caption_column)
    else:
        data = load_hf_dataset(args.dataset_name, args.train_data_dir, args.dataset_config_name, args.cache_dir)
        caption_column = args.caption_column or DATASET_CAPTION_COLUMN
        require_columns(data, {"--caption_column": caption_column})
        prompts, stats = prompts_from_dataset(data, caption_column)
    if args.max_train_samples is not None and args.max_train_samples < len(prompts):
        prompts = [prompts[i] for i in subset_rows(len(prompts), args.max_train_samples)]
        logger.warning("--max_train_samples %d: training on %d of the %d prompts.", args.max_train_samples, len(prompts), stats["prompts"])
    logger.warning("Prompts: %d (blank or missing skipped: %d, duplicates kept: %d).", len(prompts), stats["blank_skipped"], stats["duplicates"])
    return prompts


def main(args: argparse.Namespace) -> None:
    dataset = PromptDataset(load_prompts(args))
    trainer = Trainer(args, dataset, collate_prompts, needs_reference=True, variant="RLHF")
    trainer.train(rlhf_step)


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
