#!/usr/bin/env python
"""SFT Diffusion-Sharpening for SDXL (arXiv 2502.12146, Algorithm 1).

For each image-text pair (x, c): noise x with n fresh noises at a timestep t on the DDIM grid, run m DDIM
steps from each without grad, score every step's x0 preview with the reward on the real caption, find the
trajectory with the highest path reward (Eq. 8) and regress (Eq. 9's loss) toward it. By default
(`--sft_target best_endpoint`, `--path_reward final`) every path is continued without grad to the end of the grid,
scored on the image it finishes at, and the states of all n trajectories are regressed onto the finished image of
the best one, so that every path learns to end where the best did; Eq. 9's literal target (`--sft_target noise`,
the winner's starting noise, i.e. back toward x) does not raise the reward: see sharpening/targets.py.

    accelerate launch train_sft_diffusion_sharpening_sdxl.py --pretrained_model_name_or_path ... --dataset_name ...
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from reward import add_reward_args
from sharpening.data import DATASET_CAPTION_COLUMN, ImageTextDataset, collate_image_text, load_hf_dataset, require_columns, subset_rows
from sharpening.targets import SFT_TARGETS, per_prompt_mean, sft_rows
from sharpening.config import add_training_args, refuse_unused_flags, validate_training_args
from sharpening.training import StepResult, Trainer

logger = logging.getLogger("sharpening")


def parse_args(argv: list[str] | None = None, description: str = __doc__) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser)
    add_reward_args(parser, argv)
    parser.add_argument(
        "--sft_target", default="best_endpoint", choices=sorted(SFT_TARGETS),
        help="What the selected states are regressed toward. " + " ".join(f"{k}: {v}" for k, v in SFT_TARGETS.items()),
    )
    # Score each path by the image it finishes at and regress toward the winner's FINISHED image: measured on both toy
    # models, regressing onto the last blurry preview (Eq. 8's sum) held back every reward that wants detail
    # (README "Training targets"). RLHF keeps Eq. 8's sum, where both sides of the contrast share that blur.
    parser.set_defaults(path_reward="final")
    parser.add_argument(
        "--data_anchor_weight", type=float, default=0.0,
        help="Adds this weight times the ordinary diffusion loss toward the data image on the same states (keeps a "
             "reward-seeking target from drifting away from the data; 0 = off).",
    )
    args = parser.parse_args(argv)
    if args.data_anchor_weight < 0:
        parser.error("--data_anchor_weight must be >= 0 (a negative weight pushes away from the data).")
    refuse_unused_flags(parser, args, ["weighting_scheme", "logit_mean", "logit_std"],
                        "they shape freshly drawn noise levels (RLHF's --dpo_target fresh); SFT trains on the states its paths visit")
    validate_training_args(parser, args)
    return args


def sft_step(trainer: Trainer, batch: dict, generator: torch.Generator) -> StepResult:
    """Algorithm 1 for one micro-batch of B image-text pairs."""
    args, captions = trainer.args, batch["captions"]
    time_ids = trainer.family.time_ids(batch["original_sizes"], batch["crops_top_left"], (args.resolution,) * 2)
    x0 = trainer.encode_images(batch["pixel_values"], generator)

    # Explore n trajectories per pair (no grad) and pick the best path per prompt (by default by the image each
    # finishes at; Eq. 8's sum of preview rewards with --path_reward sum).
    cond = trainer.conditioning(captions, time_ids)
    candidates = trainer.explore_candidates(x0, cond, captions, generator)
    selection = candidates.selection

    # Eq. 9 on the selected states, recomputed with grad; caption dropout applies to this conditioning only.
    rows = sft_rows(args.sft_target, trainer.sampler, candidates)
    prediction = trainer.predict(trainer.policy(grad=True), rows, trainer.caption_dropout(cond, generator))
    mse = trainer.row_errors(prediction, rows)
    if args.data_anchor_weight:
        # x0 is NaN where encoding overflowed (then no path is scored): zeroed like the rows, as that prompt does not train
        anchor = rows.with_clean(trainer.sampler, x0[rows.prompt]).finite_where_untrained(selection.sft_trains)
        mse = mse + args.data_anchor_weight * trainer.row_errors(prediction, anchor)

    logs = trainer.exploration_logs(candidates) | {"timestep": candidates.exploration.timesteps[0].float().mean().item()}
    return StepResult(per_prompt_mean(mse, rows.prompt, len(captions)), selection.sft_trains, logs)


def warn_if_no_choice(args: argparse.Namespace) -> None:
    """One candidate leaves nothing to choose: an endpoint target then regresses each path onto its own end image,
    self-distillation without reward evidence (README, benchmarks/quality.py's n = 1 ablation: it collapsed)."""
    if args.num_noisy_latents == 1 and args.sft_target in ("endpoint", "best_endpoint"):
        logger.warning("--num_noisy_latents 1 with --sft_target %s: one candidate leaves nothing to choose, so every path is "
                       "regressed onto its own end image (self-distillation; in the n = 1 ablation it collapsed by 120 steps). "
                       "Use n >= 2 to sharpen, or --sft_target noise for ordinary fine-tuning.", args.sft_target)


def main(args: argparse.Namespace) -> None:
    data = load_hf_dataset(args.dataset_name, args.train_data_dir, args.dataset_config_name, args.cache_dir)
    caption_column = args.caption_column or DATASET_CAPTION_COLUMN
    require_columns(data, {"--image_column": args.image_column, "--caption_column": caption_column})
    if args.max_train_samples is not None:
        data = data.select(subset_rows(len(data), args.max_train_samples))
    dataset = ImageTextDataset(data, args.image_column, caption_column, args.resolution, args.center_crop, args.random_flip, args.seed)
    trainer = Trainer(args, dataset, collate_image_text, needs_reference=False, variant="SFT")
    if trainer.accelerator.is_main_process:
        warn_if_no_choice(args)
    trainer.train(sft_step)


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
