"""The Accelerate training loop both scripts share.

A script supplies its flags, its dataset and one function `step(trainer, batch, generator) -> StepResult`
(the paper's Algorithm 1 or 2 for one micro-batch). Everything else lives here once: the Accelerator,
the optimizer and LR schedule, gradient accumulation, exploration of candidate trajectories, the update with its
non-finite and no-preference guards, SIGTERM, bad-row accounting, tracking and validation. The trained model
(precision, LoRA, reference, EMA) is sharpening/policy.py's, checkpoints and the export sharpening/checkpoint.py's,
and everything model-specific goes through the family module (sharpening/sdxl.py) and its sampler.

Randomness of a micro-batch (timesteps, noises, caption dropout) comes from a generator seeded by
(seed, epoch, micro-batch index, rank) and the data order from (seed, epoch), so a resumed run repeats an
uninterrupted one exactly, without restoring RNG states.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import tracking
from .checkpoint import SIGTERM_EXIT_CODE, Checkpoints, check_fresh_output_dir
from .config import named_trackers, public_config, redacted_argv, secret_flag_names
from .families import apply_text_settings, cfg_scale, check_family_flags, check_resolution, family_of, with_guidance
from .losses import masked_sum, per_sample_mse
from .policy import Policy
from .sampler import sample
from .targets import Rows
from .trajectory import (Candidates, draw_start_indices, effective_steps, explore, first_start_index, last_legal_start,
                         last_start_index, path_reward, score_exploration, select, within_prompt_squares)

logger = logging.getLogger("sharpening")

# Counts a step logs per micro-batch that are totals, not rates: summed over the window's micro-batches and the
# processes (as trained_prompts is), where every other logged value is averaged.
SUMMED_LOGS = ("skipped_prompts", "reward/unscored_candidates")
# Consecutive fp16 overflow skips before a run is stopped: from GradScaler's initial scale 2^16, 40 halvings reach
# 2^-24, fp16's smallest subnormal, where no gradient is representable any more (a few in a row are normal early on).
FP16_OVERFLOW_LIMIT = 40


def _ignore_sigterm(worker_id: int) -> None:
    """Data-loader workers leave SIGTERM to the main process. SLURM and torch's elastic launcher signal the whole process
    group; a worker that died of it made the main process raise "DataLoader worker is killed by signal" mid-step,
    before the checkpoint a preemption is owed. The main process still shuts its workers down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def mix_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------- step API
@dataclass
class StepResult:
    """What a variant's step returns for one micro-batch of B prompts. The Trainer sums the losses of the trained
    prompts and, at the update, divides by the number of trained prompts over the whole accumulation window and
    all processes, so every trained prompt weighs the same however the ties fell across micro-batches."""

    prompt_losses: torch.Tensor  # (B,) each prompt's loss (any value, even NaN, where not trained)
    trained: torch.Tensor  # (B,) bool: the prompt had a usable reward ranking and counts in the update
    logs: dict[str, float] = field(default_factory=dict)

    @property
    def num_trained(self) -> int:
        return int(self.trained.sum())

    def loss_sum(self) -> torch.Tensor:
        return masked_sum(self.prompt_losses, self.trained)


StepFn = Callable[["Trainer", dict, torch.Generator], StepResult]


@dataclass(frozen=True)
class PooledMean:
    """A logged mean over some items of a micro-batch (its prompts with a preference, its scored candidates), kept as
    a sum and a count so that the update logs the mean over every such item of the window and of all processes: a
    plain mean of the micro-batches' means would weigh a micro-batch's one preferred prompt like another's eight."""

    total: float = 0.0
    count: int = 0

    @classmethod
    def of(cls, values: torch.Tensor) -> "PooledMean":
        values = values.detach().float()
        finite = values[torch.isfinite(values)]
        return cls(float(finite.sum()), int(finite.numel()))

    def __add__(self, other: "PooledMean") -> "PooledMean":
        return PooledMean(self.total + other.total, self.count + other.count)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


# --------------------------------------------------------------------------------------------- trainer
def min_snr_weight(snr: torch.Tensor, gamma: float, loss_on: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023, arXiv 2303.09556; diffusers' --snr_gamma): weigh each state's loss so that it
    counts an x0 error with at most min(SNR, gamma). Why it matters here: the default targets regress a candidate's
    state onto the WINNER's end image through the noise that maps it exactly there, (x_t - sqrt(abar) c) / sqrt(1 - abar)
    or (x_t - (1 - sigma) c) / sigma, which grows without bound near the end of sampling while x_t - c does not, so one
    such row can swamp the batch (README, "A known defect of the default targets"). `loss_on` is what the MSE is on,
    with diffusers' rule for each: epsilon (an x0 error weighs SNR) min(1, gamma / SNR); v (SNR + 1)
    min(SNR, gamma) / (SNR + 1); sample, an x0-prediction model (1) min(SNR, gamma). Flow families' velocity loss takes
    the epsilon rule, which caps its x0 weight (1 + sqrt(SNR))^2 near gamma."""
    if loss_on == "sample":
        return torch.clamp(snr, max=gamma)
    weight = torch.clamp(gamma / snr, max=1.0)  # min(SNR, gamma) / SNR, finite at SNR = 0 (flow matching's sigma = 1)
    return weight * snr / (snr + 1) if loss_on == "v" else weight


def configure_cuda_kernels(args) -> None:
    """Process-wide CUDA kernel choices from the flags (nothing to do without CUDA)."""
    if not torch.cuda.is_available():
        return
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if not args.cudnn_attention:
        # cuDNN's fused attention, one of SDPA's CUDA backends, gave non-finite bf16 gradients (and "mha_graph.execute"
        # failures at 1024 px) when training FLUX on an H200 with torch 2.11, where SDPA without it trained cleanly
        # (scripts/flux_cuda_probe.py). Flash and memory-efficient attention take over.
        torch.backends.cuda.enable_cudnn_sdp(False)


class Trainer:
    def __init__(self, args: argparse.Namespace, dataset, collate_fn, needs_reference: bool, variant: str):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, broadcast_object_list

        self.args, self.variant = args, variant
        # The model family module (sharpening/sdxl.py, sharpening/sd3.py): loading, conditioning, the denoiser call,
        # the sampler, the VAE and saving all go through it.
        self.family = family_of(args.pretrained_model_name_or_path, args.revision)
        check_family_flags(self.family, args)  # before loading
        check_resolution(self.family, args.pretrained_model_name_or_path, args.resolution, args.revision)  # before loading
        check_fresh_output_dir(args)  # before loading
        # accelerate takes "all" or a list of trackers (the string "tensorboard,wandb" it refuses)
        log_with = "all" if args.report_to == "all" else named_trackers(args.report_to) or None
        self.accelerator = acc = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        )
        if acc.mixed_precision == "fp16" and acc.device.type == "cpu":  # set by `accelerate launch` or its config
            raise ValueError("fp16 mixed precision needs a CUDA GPU (the CPU's half-precision matmuls fail on the first "
                             "step); use --mixed_precision no or bf16 on CPU.")
        args.mixed_precision = acc.mixed_precision  # what was used, wherever it was set: trackers and the model card
        if len(dataset) < args.train_batch_size * acc.num_processes:  # known now: say so before minutes of loading
            raise ValueError(f"The data ({len(dataset)} rows) do not fill one batch of --train_batch_size {args.train_batch_size} on "
                             f"each of the {acc.num_processes} process(es): lower --train_batch_size or give more data.")
        # Every rank must share one seed (data order is sharded from it); without --seed each drew its own.
        args.seed = broadcast_object_list([args.seed])[0]
        if hasattr(dataset, "seed"):
            dataset.seed = args.seed
        if hasattr(dataset, "max_bad_fraction"):
            dataset.max_bad_fraction = args.max_bad_fraction  # bounds its search for a readable stand-in row
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if acc.is_local_main_process else logging.WARNING)
        if acc.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
        configure_cuda_kernels(args)
        self.device = acc.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)

        from reward import build_reward

        # The reward first: weights it cannot find (a hub id offline, a wrong folder) fail before minutes of loading
        # the diffusion model. Its loading draws nothing from the generators the run uses (LoRA seeds its own).
        self.reward = build_reward(args.reward_model, args, device=self.device)
        self._load_models(needs_reference)
        self._setup_optimisation(dataset, collate_fn)
        self.checkpoints = Checkpoints(args, acc, self.model, self.family)
        self.stop_requested = False
        self.last_explored = None
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.counters = {"bad_rows": 0, "rows_read": 0, "nonfinite_skips": 0, "no_preference_skips": 0, "fp16_overflow_skips": 0}
        # Running sums a step function keeps across steps (checkpointed with the counters): pooled_reward_spread's.
        self.running = {"reward_squares": 0.0, "reward_dof": 0}
        self.reward_counters_before: dict = {}  # the reward's counters of the run up to the checkpoint resumed from
        self.last_validated_step: int | None = None
        if acc.is_main_process and log_with:
            sys.argv[1:] = redacted_argv(sys.argv[1:], secret_flag_names(args))  # wandb saves the command line itself
            acc.init_trackers(args.tracker_project_name, config=public_config(args))

    # ----------------------------------------------------------------------------------------- setup
    def _load_models(self, needs_reference: bool) -> None:
        args, family = self.args, self.family
        parts = family.load(args.pretrained_model_name_or_path, args.pretrained_vae_model_name_or_path, args.revision, args.variant)
        apply_text_settings(parts, args)
        if args.prediction_type:
            parts.scheduler_config["prediction_type"] = args.prediction_type
        self.parts = parts
        self.sampler = family.make_sampler(parts, args.infer_steps, args.resolution)
        if args.weighting_scheme != "none":  # a flow family (check_family_flags)
            self.sampler.set_train_density(args.weighting_scheme, args.logit_mean, args.logit_std)
        self.num_steps = effective_steps(self.sampler, args.trajectory_nums)
        if self.num_steps != args.trajectory_nums:
            logger.warning("--trajectory_nums %d clipped to %d (the sampling grid has %d steps).", args.trajectory_nums, self.num_steps, len(self.sampler.grid))
        self.first_start = first_start_index(self.sampler, args.max_start_timestep)
        self.last_start = last_start_index(self.sampler, args.min_start_timestep)
        if self.first_start > last_legal_start(self.sampler, self.num_steps, self.last_start):
            raise ValueError(f"--max_start_timestep {args.max_start_timestep} / --min_start_timestep {args.min_start_timestep} leave no start "
                             f"on the grid ({[round(float(t), 1) for t in self.sampler.grid]}) with room for {self.num_steps} steps: widen "
                             "the range or lower --trajectory_nums.")
        parts.vae.requires_grad_(False).to(self.device, dtype=family.vae_dtype(parts.vae, self.weight_dtype))
        if args.vae_tiling:
            parts.vae.enable_tiling()
        for encoder in parts.text_encoders:
            encoder.requires_grad_(False).to(self.device, dtype=self.weight_dtype)
        self.model = Policy(parts.denoiser, family, args, self.accelerator, self.weight_dtype, needs_reference)

    def _setup_optimisation(self, dataset, collate_fn) -> None:
        from diffusers.optimization import get_scheduler

        from .data import EpochSampler

        args, acc = self.args, self.accelerator
        self.dataset = dataset
        self.data_order = EpochSampler(len(dataset), args.seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.train_batch_size, sampler=self.data_order, collate_fn=collate_fn,
            num_workers=args.dataloader_num_workers, drop_last=True, worker_init_fn=_ignore_sigterm,
        )
        lr = args.learning_rate
        if args.scale_lr:
            lr *= args.gradient_accumulation_steps * args.train_batch_size * acc.num_processes
        if args.use_8bit_adam:
            import bitsandbytes as bnb

            optimizer_cls = bnb.optim.AdamW8bit
        else:
            optimizer_cls = torch.optim.AdamW
        optimizer = optimizer_cls(
            self.model.trainable_params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
        )
        # The prepared loader's length is the per-process number of micro-batches (accelerate shards with
        # drop_last); the schedule needs the number of updates that will really happen.
        loader = acc.prepare(loader)
        if len(loader) == 0:
            raise ValueError(
                f"The dataset ({len(dataset)} rows) does not fill one batch of {args.train_batch_size} on each of the {acc.num_processes} processes."
            )
        self.updates_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
        if args.max_train_steps is None:
            args.max_train_steps = args.num_train_epochs * self.updates_per_epoch
        args.num_train_epochs = math.ceil(args.max_train_steps / self.updates_per_epoch)
        lr_scheduler = get_scheduler(
            args.lr_scheduler, optimizer=optimizer,
            # The prepared scheduler steps once per process per update (diffusers does the same scaling).
            num_warmup_steps=args.lr_warmup_steps * acc.num_processes,
            num_training_steps=args.max_train_steps * acc.num_processes,
        )
        self.loader = loader
        self.optimizer, self.lr_scheduler = self.model.prepare(optimizer, lr_scheduler)

    # ----------------------------------------------------------------------------------------- model calls
    def policy(self, grad: bool):
        """f(x, t, cond) of the trained model (with grad: through the DDP wrapper)."""
        return self.model.forward(grad)

    def reference(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The frozen base model's output, run with the policy's numerics."""
        return self.model.reference(x, t, cond)

    def conditioning(self, captions: list[str], time_ids: torch.Tensor):
        """Prompt embeddings of the captions."""
        return self.family.encode_prompts(self.parts, captions, time_ids, self.device)

    def caption_dropout(self, cond, generator: torch.Generator):
        """The TRAINING conditioning: each row replaced, with probability --proportion_empty_prompts, by the same
        empty conditioning that classifier-free guidance uses (the family's `unconditional`), so the unconditional branch
        the model learns here is the one sampling calls."""
        if self.args.proportion_empty_prompts <= 0:
            return cond
        drop = torch.rand(len(cond), generator=generator) < self.args.proportion_empty_prompts
        if not drop.any():
            return cond
        return cond.where(~drop, self.family.unconditional(self.parts, cond, self.device))

    def default_time_ids(self, batch_size: int) -> torch.Tensor:
        r = self.args.resolution
        return self.family.time_ids([(r, r)] * batch_size, [(0, 0)] * batch_size, (r, r))

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        scale = 2 ** (len(self.parts.vae.config.block_out_channels) - 1)
        return (batch_size, self.family.latent_channels(self.parts), self.args.resolution // scale, self.args.resolution // scale)

    def randn(self, shape, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(self.device)

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pixels in [-1, 1] -> the model's latents (fp32), sampled from the VAE posterior with `generator`."""
        return self.family.encode_images(self.parts.vae, pixels, generator).float()

    def decode(self, latents: torch.Tensor):
        """(images, finite flags) of scaled latents."""
        return self.family.decode(self.parts.vae, latents, self.args.decode_batch_size)

    @torch.no_grad()
    def rollout(self, cond, generator: torch.Generator, clean: bool = True) -> torch.Tensor:
        """x0 generated by the CURRENT policy with CFG on the --infer_steps grid (Algorithm 2, line 2): the last step's
        clean prediction, or (clean=False, validation images) the latent the family's pipeline would decode."""
        model = with_guidance(self.family, self.parts, self.policy(grad=False), cond, cfg_scale(self.parts, self.args), self.device)
        return sample(model, self.sampler, self.randn(self.latent_shape(len(cond)), generator), cond, clean)

    @torch.no_grad()
    def explore_candidates(self, x0: torch.Tensor, cond, prompts: list[str], generator: torch.Generator) -> Candidates:
        """Shared exploration: n fresh noises at a per-prompt position on the sampling grid, m no-grad sampler steps
        (continued to the end of the grid with --path_reward final), every scored image (the x0 previews, or each path's
        finished image) scored against the real caption in one reward call, path reward (Eq. 8), per-prompt ranking."""
        n, batch = self.args.num_noisy_latents, x0.shape[0]
        start = draw_start_indices(self.sampler, batch, self.num_steps, generator, self.first_start, self.last_start).repeat(n)
        noise = self.randn((n * batch, *x0.shape[1:]), generator)
        x_t = self.sampler.add_noise(x0.repeat(n, 1, 1, 1), noise, self.sampler.grid[start])
        cond_n = cond.repeat(n)
        model = with_guidance(self.family, self.parts, self.policy(grad=False), cond_n, self.args.explore_guidance_scale, self.device)
        exploration = explore(model, self.sampler, x_t, start, cond_n, self.num_steps, to_end=self.args.path_reward == "final")
        score_exploration(exploration, prompts * n, self.decode, self.reward)
        rewards = path_reward(exploration.step_rewards, self.args.path_reward)
        candidates = Candidates(x0, noise, exploration, rewards, select(rewards, n))
        self.last_explored = (candidates, prompts)  # what the next trajectory grid shows
        return candidates

    def predict(self, model, rows: Rows, cond) -> torch.Tensor:
        """`model`'s output on the rows' states, each with its prompt's conditioning (one batched call)."""
        return model(rows.states, rows.timesteps, cond.select(rows.prompt))

    def row_errors(self, prediction: torch.Tensor, rows: Rows) -> torch.Tensor:
        """(R,) per-row squared error of `prediction` against the rows' targets, weighted as --loss_weighting and
        --snr_gamma say."""
        mse = per_sample_mse(prediction, rows.target(self.sampler))
        if self.args.loss_weighting != "none":
            mse = mse * (self.sampler.v_loss_weight(rows.timesteps) / self.sampler.mean_v_loss_weight()).to(mse)
        if self.args.snr_gamma is not None:
            loss_on = {"v_prediction": "v", "sample": "sample"}.get(getattr(self.sampler, "prediction_type", None), "epsilon")
            mse = mse * min_snr_weight(self.sampler.snr(rows.timesteps), self.args.snr_gamma, loss_on).to(mse)
        return mse

    @staticmethod
    def exploration_logs(candidates: Candidates) -> dict:
        sel, rewards = candidates.selection, candidates.path_rewards
        finite = rewards[torch.isfinite(rewards)]
        logs = {
            "reward/candidate_mean": PooledMean.of(finite),
            "reward/candidate_std": finite.std().item() if finite.numel() > 1 else 0.0,
            "reward/unscored_candidates": float((~torch.isfinite(rewards)).sum()),
        }
        if sel.has_winner.any():
            prompt_mean = rewards.view(-1, len(sel.winner)).nanmean(0)
            logs["reward/winner"] = PooledMean.of(sel.winner_reward[sel.has_winner])
            logs["reward/winner_minus_mean"] = PooledMean.of((sel.winner_reward - prompt_mean)[sel.has_winner])
        for name, values in candidates.exploration.step_components.items():
            logs[f"reward/component/{name}"] = PooledMean.of(values)
        return logs

    def gather_logs(self, window: "UpdateWindow") -> dict[str, float]:
        """The update's logs over ALL processes (every rank calls this): the loss is the mean over every trained
        prompt of the window, trained_prompts and the reward's counters are sums, per-prompt metrics (PooledMean) the
        mean over every prompt or candidate of the window, other metrics the mean of the processes' values. Without it a tracker would show rank 0's share only."""
        from accelerate.utils import gather_object

        local = {"logs": window.logs(), "pooled": window.pooled, "loss_sum": window.loss_sum, "num_trained": window.num_trained,
                 "counters": self.reward.counters()}
        parts = gather_object([local]) if self.accelerator.num_processes > 1 else [local]
        keys = dict.fromkeys(k for part in parts for k in part["logs"])
        logs = {k: float(sum(p["logs"].get(k, 0.0) for p in parts)) if k in SUMMED_LOGS
                else finite_mean([p["logs"].get(k, np.nan) for p in parts]) for k in keys}
        for k in dict.fromkeys(k for part in parts for k in part["pooled"]):
            logs[k] = sum((p["pooled"].get(k, PooledMean()) for p in parts), PooledMean()).mean
        trained = sum(p["num_trained"] for p in parts)
        logs["loss"] = sum(p["loss_sum"] for p in parts) / trained if trained else float("nan")
        logs["trained_prompts"] = float(trained)
        return logs | {f"reward_model/{k}": v for k, v in self._run_reward_counters([p["counters"] for p in parts]).items()}

    def gathered_reward_counters(self) -> dict:
        """_run_reward_counters of every process's reward (every rank calls this)."""
        from accelerate.utils import gather_object

        local = [self.reward.counters()]
        return self._run_reward_counters(gather_object(local) if self.accelerator.num_processes > 1 else local)

    def _run_reward_counters(self, per_process: list[dict]) -> dict:
        """The reward's cumulative counters (grader failures, unscored images) over all processes and the whole run:
        the reward object counts from its own start, so a resumed run adds what the checkpoint recorded."""
        counters = dict(self.reward_counters_before)
        for part in per_process:
            for key, value in part.items():
                counters[key] = counters.get(key, 0) + value
        return counters

    # ----------------------------------------------------------------------------------------- loop
    def train(self, step_fn: StepFn) -> None:
        args, acc = self.args, self.accelerator
        global_step, first_epoch, skip_batches = self._maybe_resume()
        self.checkpoints.mark_preempted(None)  # this run takes over from a preempted one
        nonfinite_in_a_row = skipped_in_a_row = overflow_in_a_row = 0
        progress = _progress_bar(args.max_train_steps, global_step, not acc.is_local_main_process)
        logger.info(
            "Training %s: %d steps, %d processes x batch %d x accumulation %d, n=%d, m=%d, grid of %d steps %g..%g.",
            self.variant, args.max_train_steps, acc.num_processes, args.train_batch_size, args.gradient_accumulation_steps,
            args.num_noisy_latents, self.num_steps, len(self.sampler.grid), float(self.sampler.grid[0]), float(self.sampler.grid[-1]),
        )
        window = UpdateWindow()
        for epoch in range(first_epoch, args.num_train_epochs):
            if global_step >= args.max_train_steps:  # resumed from the last step's checkpoint: nothing left to train
                break
            loader = self.loader
            if epoch == first_epoch and skip_batches:
                loader = acc.skip_first_batches(self.loader, skip_batches)
            # Accelerate's loaders re-seed the sampler and dataset from their own iteration counter when
            # iterated; set it, so the skip-loader of a resumed epoch and the next epochs agree with an
            # uninterrupted run.
            loader.set_epoch(epoch)
            self.data_order.set_epoch(epoch)
            self.dataset.set_epoch(epoch)
            start = skip_batches if epoch == first_epoch else 0
            for micro_index, batch in enumerate(loader, start=start):
                self._count_rows(batch)
                generator = torch.Generator().manual_seed(mix_seed(args.seed, epoch, micro_index, acc.process_index))
                outcome = self.train_micro_batch(step_fn, batch, generator, window)
                if outcome is None:
                    continue
                if outcome == "nonfinite":
                    nonfinite_in_a_row += 1
                    if nonfinite_in_a_row >= args.max_nonfinite_steps:
                        raise RuntimeError(
                            f"{nonfinite_in_a_row} consecutive updates had a non-finite loss or gradient; stopping. "
                            "Lower --learning_rate, use bf16 or the fp16-fix VAE, or resume from the last checkpoint."
                        )
                elif outcome == "overflow":
                    overflow_in_a_row += 1
                    if overflow_in_a_row >= FP16_OVERFLOW_LIMIT:
                        raise RuntimeError(
                            f"{overflow_in_a_row} consecutive fp16 updates overflowed: the gradient is non-finite at any loss scale. "
                            "Use bf16, lower --learning_rate, or resume from the last checkpoint."
                        )
                    if overflow_in_a_row % 10 == 0:
                        logger.warning("%d consecutive fp16 updates overflowed and were skipped.", overflow_in_a_row)
                elif outcome == "updated":
                    nonfinite_in_a_row = skipped_in_a_row = overflow_in_a_row = 0
                if outcome == "skipped":
                    skipped_in_a_row += 1
                    if skipped_in_a_row % 10 == 0:
                        logger.warning(
                            "%d consecutive updates had no prompt with a usable reward ranking (all tied or unscored): "
                            "check the reward (its counters are logged under reward_model/).", skipped_in_a_row,
                        )
                global_step += 1
                progress.update(1)
                logs = self.gather_logs(window) | {"lr": self.lr_scheduler.get_last_lr()[0], "epoch": epoch}
                logs |= {f"count/{k}": v for k, v in self.counters.items()}
                progress.set_postfix(loss=f"{logs.get('loss', float('nan')):.4g}", outcome=outcome)
                acc.log(logs, step=global_step)
                if acc.is_main_process and args.log_trajectories_every and global_step % args.log_trajectories_every == 0 and self.last_explored:
                    tracking.log_trajectories(acc, *self.last_explored, global_step, args.log_trajectories_prompts)
                window = UpdateWindow()
                stop = self._any_process(self.stop_requested)
                if global_step % args.checkpointing_steps == 0 or stop:
                    self.checkpoints.save(global_step, self.counters, self.running | {"reward_counters": self.gathered_reward_counters()})
                if stop:
                    self.checkpoints.mark_preempted(global_step)
                    logger.warning("SIGTERM: checkpoint-%d written; exiting with %d.", global_step, SIGTERM_EXIT_CODE)
                    self._end_training()
                    sys.exit(SIGTERM_EXIT_CODE)
                if args.validation_steps and global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
                    self.validate(global_step)  # the last step's validation comes after the export, below
                if global_step >= args.max_train_steps:
                    break
            if global_step >= args.max_train_steps:
                break
            if args.validation_prompt and (epoch + 1) % args.validation_epochs == 0:
                self.validate(global_step)
        progress.close()
        acc.wait_for_everyone()
        # The model first: a failure while generating the last validation images must not cost the trained weights.
        self.checkpoints.save_final(self.parts, self.variant, self.num_steps)
        self.validate(global_step)
        logger.info("Peak memory of this process: %s.", peak_memory(self.device))
        self._end_training()

    def _end_training(self) -> None:
        """Every rank waits until the main process has written its files, then all tear the process group down
        together. A rank that destroyed its gloo group and exited while rank 0 was still writing the final pipeline
        was once killed by SIGABRT ("terminate called without an active exception") in a 2-process CPU run, and the
        launcher then reported the whole run as failed. It happened again with that wait in place (rarely; not
        reproduced on demand). The likely cause: the DDP wrapper's reducer still holds the gloo group after
        destroy_process_group, so the group's worker threads are torn down during interpreter shutdown (the SIGABRT
        described in pytorch/pytorch#179291). Dropping every reference to the wrapper first (ours and the
        accelerator's) lets the group go while the interpreter is alive."""
        self.accelerator.wait_for_everyone()
        self.model.unet = self.model.raw_unet
        self.accelerator.free_memory()
        self.accelerator.end_training()

    def train_micro_batch(self, step_fn: StepFn, batch: dict, generator: torch.Generator, window: "UpdateWindow") -> str | None:
        """One micro-batch: the variant's step and the backward of its summed loss; at the end of an accumulation
        window also the update. Returns the update's outcome ("updated", "skipped", "nonfinite", "overflow"), or
        None in the middle of a window."""
        acc = self.accelerator
        with acc.accumulate(self.model.unet):
            result = step_fn(self, batch, generator)
            acc.backward(result.loss_sum())
            window.add(result)
            if not acc.sync_gradients:
                return None
            return self._finish_update(window)

    def _finish_update(self, window: "UpdateWindow") -> str:
        """At the end of an accumulation window: skip, step, or let the fp16 scaler skip. Returns the outcome."""
        acc = self.accelerator
        flags = acc.reduce(torch.tensor([float(window.nonfinite_loss), float(window.num_trained)], device=self.device), reduction="sum")
        if flags[0] > 0:
            self.optimizer.zero_grad(set_to_none=True)
            self.counters["nonfinite_skips"] += 1
            logger.warning("Non-finite loss: update skipped, weights unchanged.")
            return "nonfinite"
        if flags[1] == 0:
            self.optimizer.zero_grad(set_to_none=True)
            self.counters["no_preference_skips"] += 1
            logger.info("No prompt of this update had a usable reward ranking: update skipped.")
            return "skipped"
        # Gradients now hold sum_{trained prompts} grad(loss) / (processes x accumulation steps): accelerate divides
        # each backward by the accumulation steps and DDP averages over processes. Make it a mean over the
        # prompts that trained in this window on every process (one all-reduce, above).
        scale = acc.num_processes * self.args.gradient_accumulation_steps / float(flags[1])
        params = self.model.trainable_params
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
        grad_norm = acc.clip_grad_norm_(params, self.args.max_grad_norm or float("inf"))
        window.grad_norm = float(grad_norm)
        if not math.isfinite(window.grad_norm):
            if acc.scaler is not None:
                # fp16 loss scaling: the scaler skips this step itself and lowers the scale (normal early on).
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.counters["fp16_overflow_skips"] += 1
                return "overflow"
            self.optimizer.zero_grad(set_to_none=True)
            self.counters["nonfinite_skips"] += 1
            logger.warning("Non-finite gradient: update skipped, weights unchanged.")
            return "nonfinite"
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.model.ema is not None:
            self.model.ema.step(params)
        return "updated"

    def _count_rows(self, batch: dict) -> None:
        """Each example stands for one sampled row; the dataset names that row in "bad_rows" when it was bad (and
        a readable row stood in for it). So rows read = examples, and each bad row counts once per epoch."""
        names = batch.get("bad_rows", [])  # each already logged by the dataset, where it was read
        counts = self.accelerator.reduce(torch.tensor([float(len(names)), float(len(batch["captions"]))], device=self.device), reduction="sum")
        self.counters["bad_rows"] += int(counts[0])
        self.counters["rows_read"] += int(counts[1])
        # Stop only on evidence: judge the share over at least 10 / max_bad_fraction rows, so it takes more than 10
        # bad rows (a few early ones say little about the whole). A dataset smaller than that is judged over its
        # size: bad rows only add up, so once they pass the limit of one whole epoch the epoch's share will too.
        frac = self.args.max_bad_fraction
        judged_over = max(self.counters["rows_read"], min(len(self.dataset), math.ceil(10 / frac)) if frac > 0 else 0)
        if self.counters["bad_rows"] > frac * judged_over:
            raise RuntimeError(
                f"{self.counters['bad_rows']} of {self.counters['rows_read']} rows read so far were unreadable "
                f"(more than --max_bad_fraction={self.args.max_bad_fraction}); fix the data or raise the flag. See the warnings above for their names."
            )

    def _any_process(self, flag: bool) -> bool:
        return bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.device), reduction="sum")[0] > 0)

    def _on_sigterm(self, signum, frame) -> None:
        logger.warning("SIGTERM received: finishing this step, then checkpointing.")
        self.stop_requested = True

    def _maybe_resume(self) -> tuple[int, int, int]:
        """Returns (global_step, first_epoch, micro-batches to skip in that epoch)."""
        restored = self.checkpoints.resume()
        if restored is None:
            return 0, 0, 0
        global_step, counters, running = restored
        self.counters |= counters
        self.reward_counters_before = running.pop("reward_counters", {})
        self.running |= running
        # An epoch's last accumulation window may be short (accelerate syncs at the end of the data).
        epoch, update_in_epoch = divmod(global_step, self.updates_per_epoch)
        return global_step, epoch, update_in_epoch * self.args.gradient_accumulation_steps

    def pooled_reward_spread(self, path_rewards: torch.Tensor) -> float:
        """The pooled within-prompt SD of the path rewards over every prompt this run has explored, on all processes,
        this micro-batch's included: the unit of Eq. 11's reward gap under --reward_margin_units spread. Pooled over
        the run, not over the micro-batch: at --train_batch_size 1 a micro-batch's own spread comes from the one
        prompt's n rewards, and dividing its gap by that leaves a number fixed by their order alone (sqrt 2 for every
        prompt at n = 2), so gamma's term would not see how decisive a preference is. One all-reduce of two numbers."""
        squares, dof = within_prompt_squares(path_rewards, self.args.num_noisy_latents)
        total = self.accelerator.reduce(torch.tensor([squares, dof], dtype=torch.float64, device=self.device), "sum")
        self.running["reward_squares"] += float(total[0])
        self.running["reward_dof"] += int(total[1])
        dof = self.running["reward_dof"]
        return math.sqrt(self.running["reward_squares"] / dof) if dof > 0 else float("nan")

    # ----------------------------------------------------------------------------------------- outputs
    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int) -> list:
        generator = torch.Generator().manual_seed(seed)
        cond = self.conditioning(prompts, self.default_time_ids(len(prompts)))
        return self.decode(self.rollout(cond, generator, clean=False))[0]

    def validate(self, global_step: int) -> None:
        args, acc = self.args, self.accelerator
        if not args.validation_prompt or not acc.is_main_process or global_step == self.last_validated_step:
            return  # once per step: --validation_steps and --validation_epochs can fall on the same one
        self.last_validated_step = global_step
        self.model.raw_unet.eval()
        with self.model.ema_weights():
            images = self.generate([args.validation_prompt] * args.num_validation_images, args.seed)
        self.model.raw_unet.train()
        self.family.save_images(images, Path(args.output_dir) / "validation", f"step-{global_step:06d}")
        tracking.log_images(acc, "validation", images, [args.validation_prompt] * len(images), global_step)


def finite_mean(values) -> float:
    """Mean of the non-NaN values; NaN when no value is finite (where np.nanmean would warn)."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def peak_memory(device: torch.device) -> str:
    """Host peak RSS (and the CUDA allocator's peak on a GPU), for the log a user sizes the next run from."""
    import resource

    text = f"host RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    if device.type == "cuda":
        text += f", CUDA max allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return text


def _progress_bar(total: int, initial: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="Steps", disable=disable)


@dataclass
class UpdateWindow:
    """Sums over the micro-batches of one accumulation window, turned into logs at the update."""

    loss_sum: float = 0.0
    num_trained: int = 0
    nonfinite_loss: bool = False
    grad_norm: float = float("nan")
    extra: dict = field(default_factory=dict)
    pooled: dict = field(default_factory=dict)  # name -> PooledMean over the window

    def add(self, result: StepResult) -> None:
        value = float(result.loss_sum().detach())
        self.nonfinite_loss |= not math.isfinite(value)
        self.loss_sum += value
        self.num_trained += result.num_trained
        for k, v in result.logs.items():
            if isinstance(v, PooledMean):
                self.pooled[k] = self.pooled.get(k, PooledMean()) + v
            else:
                self.extra.setdefault(k, []).append(v)

    def logs(self) -> dict[str, float]:
        loss = self.loss_sum / self.num_trained if self.num_trained else float("nan")
        out = {"loss": loss, "trained_prompts": float(self.num_trained), "grad_norm": self.grad_norm}
        out |= {k: float(sum(v)) if k in SUMMED_LOGS else finite_mean(v) for k, v in self.extra.items()}
        return out | {k: v.mean for k, v in self.pooled.items()}
