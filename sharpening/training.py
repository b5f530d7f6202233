"""The Accelerate training loop both scripts share.

A script supplies its flags, its dataset and one function `step(trainer, batch, generator) -> StepResult`
(the paper's Algorithm 1 or 2 for one micro-batch). Everything else lives here once: models and precision,
LoRA/EMA, optimizer and LR schedule, gradient accumulation, exploration of candidate trajectories,
checkpoint/resume, SIGTERM, the non-finite guard, bad-row accounting, tracking and validation.

Randomness of a micro-batch (timesteps, noises, caption dropout) comes from a generator seeded by
(seed, epoch, micro-batch index, rank) and the data order from (seed, epoch), so a resumed run repeats an
uninterrupted one exactly, without restoring RNG states.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import sdxl, tracking
from .sampler import DDIM, Conditioning, guided, sample, unet_forward
from .losses import masked_sum
from .targets import Rows
from .trajectory import Candidates, draw_start_timesteps, effective_steps, explore, path_reward, score_exploration, select

logger = logging.getLogger("sharpening")

SIGTERM_EXIT_CODE = 143
PREEMPTED_MARKER = "PREEMPTED.json"
SECRET_ARGS = ("api_key",)


# --------------------------------------------------------------------------------------------- flags
def add_training_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by both scripts; names and meanings follow diffusers' train_text_to_image_sdxl.py."""
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True, help="SDXL checkpoint: hub id or local folder (diffusers layout).")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None, help="A better VAE, e.g. madebyollin/sdxl-vae-fp16-fix (needed to run the VAE in fp16).")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="Weight variant of the checkpoint, e.g. fp16.")
    g.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction"], help="Override the scheduler's prediction type.")
    g.add_argument("--use_lora", action="store_true", help="Train LoRA adapters on the UNet attention layers instead of the full UNet.")
    g.add_argument("--lora_rank", type=int, default=4)
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank).")

    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", default=None, help="Hub dataset id, a save_to_disk folder, or an imagefolder.")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_data_dir", default=None, help="Local imagefolder with metadata.jsonl or metadata.csv.")
    g.add_argument("--image_column", default="image")
    g.add_argument("--caption_column", default="text")
    g.add_argument("--max_train_samples", type=int, default=None, help="Truncate the dataset (debugging, quick runs).")
    g.add_argument("--cache_dir", default=None)
    g.add_argument("--resolution", type=int, default=1024)
    g.add_argument("--center_crop", action="store_true")
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--proportion_empty_prompts", type=float, default=0.0, help="Caption dropout of the TRAINING conditioning; rewards always score the real caption.")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--max_bad_fraction", type=float, default=0.01, help="Stop when more than this share of the rows read so far was unreadable.")

    g = parser.add_argument_group("sharpening")
    g.add_argument("--num_noisy_latents", type=int, default=3, help="n: candidate trajectories per prompt.")
    g.add_argument("--trajectory_nums", type=int, default=3, help="m: DDIM steps (scored states) per trajectory.")
    g.add_argument("--infer_steps", type=int, default=25, help="DDIM grid size; trajectories step along it (stride 1000/infer_steps).")
    g.add_argument("--path_reward", default="sum", choices=["sum", "mean"], help="Eq. 8 aggregates step rewards by sum; mean as an option.")
    g.add_argument("--explore_guidance_scale", type=float, default=1.0, help="CFG during exploration (1 = conditional only, as upstream).")
    g.add_argument("--guidance_scale", type=float, default=5.0, help="CFG of rollouts (RLHF) and validation images.")
    g.add_argument("--decode_batch_size", type=int, default=None,
                   help="VAE decodes of x0 previews per chunk (default: 8 at 512 px, scaled by pixel count: 2 at 1024 px).")
    g.add_argument("--vae_tiling", action="store_true",
                   help="Decode previews in overlapping tiles (diffusers' enable_tiling): less memory at 1024 px, slightly "
                        "different pixels at tile seams.")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=1, help="Prompts per device per micro-batch.")
    g.add_argument("--num_train_epochs", type=int, default=100)
    g.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=1e-6)
    g.add_argument("--scale_lr", action="store_true", help="Multiply the LR by accumulation x batch size x processes.")
    g.add_argument("--lr_scheduler", default="constant", help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"')
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (CUDA).")
    # Paper A.3: AdamW with betas (0, 0.99) and no weight decay.
    g.add_argument("--adam_beta1", type=float, default=0.0)
    g.add_argument("--adam_beta2", type=float, default=0.99)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--use_ema", action="store_true")
    g.add_argument("--ema_decay", type=float, default=0.9999)
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="Overrides accelerate's config.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true", help="Needs xformers and CUDA; PyTorch SDPA is the default.")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max_nonfinite_steps", type=int, default=10, help="Abort after this many consecutive updates skipped for a non-finite loss or gradient.")

    g = parser.add_argument_group("output, checkpoints, tracking")
    g.add_argument("--output_dir", default="diffusion-sharpening-output")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder.')
    g.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    g.add_argument("--tracker_project_name", default="diffusion-sharpening")
    g.add_argument("--logging_dir", default="logs")
    g.add_argument("--validation_prompt", default=None)
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_epochs", type=int, default=1, help="Validate every N epochs.")
    g.add_argument("--validation_steps", type=int, default=None, help="Also validate every N optimizer steps.")
    g.add_argument("--log_trajectories_every", type=int, default=100,
                   help="Every N optimizer steps, log the step's trajectory grids (n candidates x m previews with their rewards, "
                        "winner and loser marked) and reward histograms to the trackers; 0 = off.")
    g.add_argument("--log_trajectories_prompts", type=int, default=2, help="Prompts of the micro-batch shown in each trajectory log.")


def validate_training_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before a model is loaded."""
    from reward import validate_reward_args

    # --reward_plugin files were imported by add_reward_args, before parsing, so their rewards and flags exist.
    validate_reward_args(args)  # the spec, and what each reward needs (weights path, grader key)
    if args.num_noisy_latents < 1 or args.trajectory_nums < 1:
        raise ValueError("--num_noisy_latents and --trajectory_nums must be >= 1.")
    if args.infer_steps < 1 or 1000 % args.infer_steps and args.infer_steps > 1000:
        raise ValueError("--infer_steps must be between 1 and 1000.")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise ValueError("--proportion_empty_prompts must be in [0, 1].")
    if args.decode_batch_size is not None and args.decode_batch_size < 1:
        raise ValueError("--decode_batch_size must be >= 1 (or left out for the resolution's default).")
    if args.resolution % 8:
        raise ValueError("--resolution must be divisible by 8.")
    if args.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ValueError("--enable_xformers_memory_efficient_attention needs `pip install xformers` (CUDA only); without the flag PyTorch SDPA is used.") from None
        if not torch.cuda.is_available():
            raise ValueError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; drop the flag on CPU (SDPA is used).")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("--use_8bit_adam needs `pip install bitsandbytes`.") from None
        if not torch.cuda.is_available():
            raise ValueError("--use_8bit_adam needs a CUDA GPU (bitsandbytes 8-bit optimizers); drop the flag on CPU.")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest" and not _resume_path(args).is_dir():
        raise ValueError(
            f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is neither a folder nor a checkpoint in --output_dir (use 'latest' or checkpoint-N)."
        )
    args.seed = _resolve_seed(args)


def _resume_path(args: argparse.Namespace) -> Path | None:
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        found = _checkpoints(Path(args.output_dir))
        return found[-1] if found else None
    path = Path(args.resume_from_checkpoint)
    # As in diffusers, a bare checkpoint name means the one inside --output_dir.
    return path if path.is_dir() else Path(args.output_dir) / path


def _resolve_seed(args: argparse.Namespace) -> int:
    """A resumed run takes its checkpoint's seed (that is what makes it continue exactly); a run without
    --seed gets a random one, recorded in its checkpoints and tracker config."""
    path = _resume_path(args)
    if path is not None:
        saved = json.loads((path / "training_state.json").read_text())["seed"]
        if args.seed is not None and args.seed != saved:
            logger.warning("Resuming with the checkpoint's seed %d instead of --seed %d, so the run continues exactly.", saved, args.seed)
        return int(saved)
    if args.seed is None:
        return int(np.random.SeedSequence().generate_state(1)[0] % (2**31))
    return args.seed


def public_config(args: argparse.Namespace) -> dict:
    """Flags as tracker config / model card data: secrets removed, values made JSON-friendly."""
    out = {}
    for key, value in vars(args).items():
        if key in SECRET_ARGS:
            continue
        out[key] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    if out.get("base_url"):
        from reward import strip_userinfo

        out["base_url"] = strip_userinfo(out["base_url"])  # a token in user:pass@host is a secret too
    return out


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


# --------------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, args: argparse.Namespace, dataset, collate_fn, needs_reference: bool, variant: str):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.args, self.variant = args, variant
        log_with = None if args.report_to in (None, "none", "") else args.report_to
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        )
        acc = self.accelerator
        # Every rank must share one seed (data order is sharded from it); without --seed each drew its own.
        from accelerate.utils import broadcast_object_list

        args.seed = broadcast_object_list([args.seed])[0]
        if hasattr(dataset, "seed"):
            dataset.seed = args.seed
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if acc.is_local_main_process else logging.WARNING)
        if acc.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
        if args.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.device = acc.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)

        self._load_models(needs_reference)
        self._setup_optimisation(dataset, collate_fn)

        from reward import build_reward

        self.reward = build_reward(args.reward_model, args, device=self.device)
        self.stop_requested = False
        self.last_explored = None
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.counters = {"bad_rows": 0, "rows_read": 0, "nonfinite_skips": 0, "no_preference_skips": 0, "fp16_overflow_skips": 0}
        if acc.is_main_process and log_with:
            acc.init_trackers(args.tracker_project_name, config=public_config(args))

    # ----------------------------------------------------------------------------------------- setup
    def _load_models(self, needs_reference: bool) -> None:
        args, acc = self.args, self.accelerator
        parts = sdxl.load_sdxl(args.pretrained_model_name_or_path, args.pretrained_vae_model_name_or_path, args.revision, args.variant)
        if args.prediction_type:
            parts.scheduler_config["prediction_type"] = args.prediction_type
        self.parts = parts
        self.ddim = DDIM(parts.scheduler_config, args.infer_steps)
        self.num_steps = effective_steps(self.ddim, args.trajectory_nums)
        if self.num_steps != args.trajectory_nums:
            logger.warning("--trajectory_nums %d clipped to %d (the DDIM grid has %d steps).", args.trajectory_nums, self.num_steps, len(self.ddim.grid))

        parts.vae.requires_grad_(False).to(self.device, dtype=sdxl.vae_dtype(parts.vae, self.weight_dtype))
        if args.vae_tiling:
            parts.vae.enable_tiling()
        for encoder in parts.text_encoders:
            encoder.requires_grad_(False).to(self.device, dtype=self.weight_dtype)
        unet = parts.unet
        if args.enable_xformers_memory_efficient_attention:
            unet.enable_xformers_memory_efficient_attention()

        self.reference_unet = None
        if args.use_lora:
            from peft import LoraConfig

            unet.requires_grad_(False).to(self.device, dtype=self.weight_dtype)
            unet.add_adapter(
                LoraConfig(
                    r=args.lora_rank,
                    lora_alpha=args.lora_alpha or args.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=["to_k", "to_q", "to_v", "to_out.0"],
                )
            )
            for p in unet.parameters():  # adapters train in fp32 even when the base runs in half precision
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            unet.requires_grad_(True).to(self.device, dtype=torch.float32)
            if needs_reference:
                # Frozen base model for the RLHF log-ratio (with LoRA the same UNet with adapters off serves), in
                # the policy's dtype: a half-precision copy would differ from the fp32 policy under autocast, so the
                # DPO logits would not start at 0 and beta (2500) would turn that rounding into a random preference.
                self.reference_unet = copy.deepcopy(unet).requires_grad_(False).eval()
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.trainable_params = [p for p in unet.parameters() if p.requires_grad]

        self.ema = None
        if args.use_ema:
            from diffusers.training_utils import EMAModel

            if args.use_lora:  # EMA of the adapters: checkpointed with accelerate's custom state
                self.ema = EMAModel(self.trainable_params, decay=args.ema_decay)
            else:  # EMA of the whole UNet: checkpointed as a loadable `unet_ema/`, as diffusers' scripts do
                self.ema = EMAModel(self.trainable_params, decay=args.ema_decay, model_cls=type(unet), model_config=unet.config)
            self.ema.to(self.device)

    def _setup_optimisation(self, dataset, collate_fn) -> None:
        from diffusers.optimization import get_scheduler

        args, acc = self.args, self.accelerator
        from .data import EpochSampler

        self.dataset = dataset
        self.sampler = EpochSampler(len(dataset), args.seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.train_batch_size, sampler=self.sampler, collate_fn=collate_fn,
            num_workers=args.dataloader_num_workers, drop_last=True,
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
            self.trainable_params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
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
        self.unet, self.optimizer, self.lr_scheduler = acc.prepare(self.parts.unet, optimizer, lr_scheduler)
        self.raw_unet = acc.unwrap_model(self.unet)
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)
        if self.ema is not None and args.use_lora:
            acc.register_for_checkpointing(self.ema)

    # ----------------------------------------------------------------------------------------- model calls
    def policy(self, grad: bool):
        """f(x, t, cond) of the trained UNet: the DDP-wrapped module for the one grad call of a step,
        the bare module for no-grad exploration (no DDP bookkeeping)."""
        forward = unet_forward(self.unet if grad else self.raw_unet)

        def call(x, t, cond):
            with self.accelerator.autocast():
                return forward(x, t, cond)

        return call

    @torch.no_grad()
    def reference(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The frozen base model, run exactly as the policy runs (same weights dtype, inputs and autocast): a copy for
        full fine-tuning, the same UNet with adapters off for LoRA."""
        if self.reference_unet is not None:
            with self.accelerator.autocast():
                return unet_forward(self.reference_unet)(x, t, cond)
        self.raw_unet.disable_adapters()
        try:
            with self.accelerator.autocast():
                return unet_forward(self.raw_unet)(x, t, cond)
        finally:
            self.raw_unet.enable_adapters()

    def conditioning(self, captions: list[str], time_ids: torch.Tensor) -> Conditioning:
        """Prompt embeddings of the captions."""
        return sdxl.encode_prompts(self.parts, captions, time_ids, self.device)

    def caption_dropout(self, cond: Conditioning, generator: torch.Generator) -> Conditioning:
        """The TRAINING conditioning: each row replaced, with probability --proportion_empty_prompts, by the same
        empty conditioning that classifier-free guidance uses (sdxl.unconditional), so the unconditional branch
        the model learns here is the one sampling calls."""
        if self.args.proportion_empty_prompts <= 0:
            return cond
        drop = torch.rand(cond.pooled.shape[0], generator=generator) < self.args.proportion_empty_prompts
        if not drop.any():
            return cond
        return cond.where(~drop, sdxl.unconditional(self.parts, cond, self.device))

    def default_time_ids(self, batch_size: int) -> torch.Tensor:
        r = self.args.resolution
        return sdxl.time_ids([(r, r)] * batch_size, [(0, 0)] * batch_size, (r, r))

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        scale = 2 ** (len(self.parts.vae.config.block_out_channels) - 1)
        return (batch_size, self.raw_unet.config.in_channels, self.args.resolution // scale, self.args.resolution // scale)

    def randn(self, shape, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(self.device)

    def decode(self, latents: torch.Tensor):
        """(images, finite flags) of scaled latents."""
        return sdxl.decode(self.parts.vae, latents, self.args.decode_batch_size)

    @torch.no_grad()
    def rollout(self, cond: Conditioning, generator: torch.Generator) -> torch.Tensor:
        """x0 generated by the CURRENT policy with CFG on the --infer_steps grid (Algorithm 2, line 2)."""
        model = guided(self.policy(grad=False), sdxl.unconditional(self.parts, cond, self.device), self.args.guidance_scale)
        return sample(model, self.ddim, self.randn(self.latent_shape(cond.pooled.shape[0]), generator), cond)

    @torch.no_grad()
    def explore_candidates(self, x0: torch.Tensor, cond: Conditioning, prompts: list[str], generator: torch.Generator) -> Candidates:
        """Shared exploration: n fresh noises at a per-prompt timestep on the DDIM grid, m no-grad DDIM steps,
        every x0 preview scored against the real caption in one reward call, path reward (Eq. 8), per-prompt ranking."""
        n, batch = self.args.num_noisy_latents, x0.shape[0]
        t = draw_start_timesteps(self.ddim, batch, self.num_steps, generator).repeat(n)
        noise = self.randn((n * batch, *x0.shape[1:]), generator)
        x_t = self.ddim.add_noise(x0.repeat(n, 1, 1, 1), noise, t)
        cond_n = cond.repeat(n)
        model = guided(self.policy(grad=False), sdxl.unconditional(self.parts, cond_n, self.device), self.args.explore_guidance_scale)
        exploration = explore(model, self.ddim, x_t, t, cond_n, self.num_steps)
        score_exploration(exploration, prompts * n, self.decode, self.reward)
        rewards = path_reward(exploration.step_rewards, self.args.path_reward)
        candidates = Candidates(x0, noise, exploration, rewards, select(rewards, n))
        self.last_explored = (candidates, prompts)  # what the next trajectory grid shows
        return candidates

    def predict(self, model, rows: Rows, cond: Conditioning) -> torch.Tensor:
        """`model`'s output on the rows' states, each with its prompt's conditioning (one batched call)."""
        return model(rows.states, rows.timesteps, cond.select(rows.prompt.to(cond.pooled.device)))

    @staticmethod
    def exploration_logs(candidates: Candidates) -> dict[str, float]:
        sel, rewards = candidates.selection, candidates.path_rewards
        finite = rewards[torch.isfinite(rewards)]
        logs = {
            "reward/candidate_mean": finite.mean().item() if finite.numel() else float("nan"),
            "reward/candidate_std": finite.std().item() if finite.numel() > 1 else 0.0,
            "reward/unscored_candidates": float((~torch.isfinite(rewards)).sum()),
        }
        if sel.has_winner.any():
            prompt_mean = rewards.view(-1, len(sel.winner)).nanmean(0)
            logs["reward/winner"] = sel.winner_reward[sel.has_winner].mean().item()
            logs["reward/winner_minus_mean"] = (sel.winner_reward - prompt_mean)[sel.has_winner].mean().item()
        for name, values in candidates.exploration.step_components.items():
            logs[f"reward/component/{name}"] = values.nanmean().item()
        return logs

    def gather_logs(self, window: "UpdateWindow") -> dict[str, float]:
        """The update's logs over ALL processes (every rank calls this): the loss is the mean over every trained
        prompt of the window, trained_prompts and the reward's counters are sums, other metrics the mean of the
        processes' values. Without it a tracker would show rank 0's share only."""
        from accelerate.utils import gather_object

        local = {"logs": window.logs(), "loss_sum": window.loss_sum, "num_trained": window.num_trained,
                 "counters": self.reward.counters()}
        parts = gather_object([local]) if self.accelerator.num_processes > 1 else [local]
        keys = dict.fromkeys(k for part in parts for k in part["logs"])
        logs = {k: finite_mean([p["logs"].get(k, np.nan) for p in parts]) for k in keys}
        trained = sum(p["num_trained"] for p in parts)
        logs["loss"] = sum(p["loss_sum"] for p in parts) / trained if trained else float("nan")
        logs["trained_prompts"] = float(trained)
        counters = {}
        for part in parts:
            for key, value in part["counters"].items():
                counters[key] = counters.get(key, 0) + value
        return logs | {f"reward_model/{k}": v for k, v in counters.items()}

    # ----------------------------------------------------------------------------------------- loop
    def train(self, step_fn: StepFn) -> None:
        args, acc = self.args, self.accelerator
        global_step, first_epoch, skip_batches = self._maybe_resume()
        self.mark_preempted(None)  # this run takes over from a preempted one
        nonfinite_in_a_row = skipped_in_a_row = 0
        progress = _progress_bar(args.max_train_steps, global_step, not acc.is_local_main_process)
        logger.info(
            "Training %s: %d steps, %d processes x batch %d x accumulation %d, n=%d, m=%d, grid %s..%s (stride %d).",
            self.variant, args.max_train_steps, acc.num_processes, args.train_batch_size, args.gradient_accumulation_steps,
            args.num_noisy_latents, self.num_steps, int(self.ddim.grid[0]), int(self.ddim.grid[-1]), self.ddim.stride,
        )
        window = UpdateWindow()
        for epoch in range(first_epoch, args.num_train_epochs):
            loader = self.loader
            if epoch == first_epoch and skip_batches:
                loader = acc.skip_first_batches(self.loader, skip_batches)
            # Accelerate's loaders re-seed the sampler and dataset from their own iteration counter when
            # iterated; set it, so the skip-loader of a resumed epoch and the next epochs agree with an
            # uninterrupted run.
            loader.set_epoch(epoch)
            self.sampler.set_epoch(epoch)
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
                elif outcome == "updated":
                    nonfinite_in_a_row = skipped_in_a_row = 0
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
                    self.save_checkpoint(global_step)
                if stop:
                    self.mark_preempted(global_step)
                    logger.warning("SIGTERM: checkpoint-%d written; exiting with %d.", global_step, SIGTERM_EXIT_CODE)
                    acc.end_training()
                    sys.exit(SIGTERM_EXIT_CODE)
                if args.validation_steps and global_step % args.validation_steps == 0:
                    self.validate(global_step)
                if global_step >= args.max_train_steps:
                    break
            if global_step >= args.max_train_steps:
                break
            if args.validation_prompt and (epoch + 1) % args.validation_epochs == 0:
                self.validate(global_step)
        progress.close()
        acc.wait_for_everyone()
        self.validate(global_step)
        self.save_final()
        logger.info("Peak memory of this process: %s.", peak_memory(self.device))
        acc.end_training()

    def train_micro_batch(self, step_fn: StepFn, batch: dict, generator: torch.Generator, window: "UpdateWindow") -> str | None:
        """One micro-batch: the variant's step and the backward of its summed loss; at the end of an accumulation
        window also the update. Returns the update's outcome ("updated", "skipped", "nonfinite", "overflow"), or
        None in the middle of a window."""
        acc = self.accelerator
        with acc.accumulate(self.unet):
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
        for p in self.trainable_params:
            if p.grad is not None:
                p.grad.mul_(scale)
        grad_norm = acc.clip_grad_norm_(self.trainable_params, self.args.max_grad_norm or float("inf"))
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
        if self.ema is not None:
            self.ema.step(self.trainable_params)
        return "updated"

    def _count_rows(self, batch: dict) -> None:
        bad = len(batch.get("bad_rows", []))
        for name in batch.get("bad_rows", []):
            logger.warning("Bad row skipped: %s", name)
        counts = self.accelerator.reduce(torch.tensor([float(bad), float(len(batch["captions"]) + bad)], device=self.device), reduction="sum")
        self.counters["bad_rows"] += int(counts[0])
        self.counters["rows_read"] += int(counts[1])
        # Judge the share over at least ~100 rows (or the whole dataset), so one bad row early on does not
        # stop a run that would stay far below the limit.
        frac = self.args.max_bad_fraction
        judged_over = max(self.counters["rows_read"], min(len(self.dataset), max(100, math.ceil(1 / frac) if frac > 0 else 0)))
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

    # ----------------------------------------------------------------------------------------- checkpoints
    def _save_hook(self, models, weights, output_dir) -> None:
        """Checkpoint what trains in diffusers' layout, so a checkpoint is also a usable model: a full fine-tune
        as a loadable `unet/` (and `unet_ema/` with --use_ema), LoRA as `pytorch_lora_weights.safetensors`."""
        for model in models:
            if self.accelerator.is_main_process:
                if self.args.use_lora:
                    self._save_lora(Path(output_dir))
                else:
                    self.accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, "unet"), safe_serialization=True)
                    if self.ema is not None:
                        self.ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
            if weights:
                weights.pop()

    def _load_hook(self, models, input_dir) -> None:
        model = self.accelerator.unwrap_model(models.pop())
        if self.args.use_lora:
            state = self._lora_state(Path(input_dir))
        else:
            if not (Path(input_dir) / "unet" / "config.json").is_file():
                raise ValueError(f"Checkpoint {input_dir} holds no unet/: was it made by a LoRA run (then add --use_lora)?")
            state = type(model).from_pretrained(input_dir, subfolder="unet").state_dict()
            if self.ema is not None:
                from diffusers.training_utils import EMAModel

                self.ema.load_state_dict(EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), type(model)).state_dict())
                self.ema.to(self.device)
        params = dict(model.named_parameters())
        expected = {k for k, v in params.items() if v.requires_grad}
        if set(state) != expected:
            raise ValueError(
                f"Checkpoint {input_dir} does not match this run's trainable weights "
                f"({len(set(state) - expected)} unexpected, {len(expected - set(state))} missing): was it made with the same --use_lora/--lora_rank?"
            )
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def _save_lora(self, out: Path) -> None:
        from diffusers import StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.raw_unet))
        StableDiffusionXLPipeline.save_lora_weights(
            save_directory=str(out), unet_lora_layers=layers, safe_serialization=True,
            # rank and alpha travel with the weights, so load_lora_weights applies the trained scale
            unet_lora_adapter_metadata=self.raw_unet.peft_config["default"].to_dict(),
        )

    def _lora_state(self, folder: Path) -> dict[str, torch.Tensor]:
        """The adapters of a LoRA checkpoint, under this run's parameter names (the inverse of _save_lora)."""
        from diffusers import StableDiffusionXLPipeline
        from diffusers.utils import convert_unet_state_dict_to_peft

        weights = folder / "pytorch_lora_weights.safetensors"
        if not weights.is_file():
            raise ValueError(f"Checkpoint {folder} holds no pytorch_lora_weights.safetensors: was it made by a full fine-tune (then drop --use_lora)?")
        lora, _ = StableDiffusionXLPipeline.lora_state_dict(str(folder))
        peft_state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in lora.items() if k.startswith("unet.")})
        # peft names parameters `<module>.lora_A.default.weight`; the saved keys lack the adapter name.
        return {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
                for k, v in peft_state.items()}

    def save_checkpoint(self, global_step: int) -> None:
        """checkpoint-<step> written atomically: into a temp folder, renamed when complete; pruning only after."""
        acc, out = self.accelerator, Path(self.args.output_dir)
        final, tmp = out / f"checkpoint-{global_step}", out / f".tmp-checkpoint-{global_step}"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # every rank takes part
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"global_step": global_step, "seed": self.args.seed, "counters": self.counters, "layout": self.layout()}
            (tmp / "training_state.json").write_text(json.dumps(state, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            logger.info("Saved %s", final)
            self._prune_checkpoints()
        acc.wait_for_everyone()

    def _prune_checkpoints(self) -> None:
        limit = self.args.checkpoints_total_limit
        if not limit:
            return
        for old in _checkpoints(Path(self.args.output_dir))[:-limit]:
            logger.info("Removing old checkpoint %s (--checkpoints_total_limit=%d)", old, limit)
            shutil.rmtree(old)

    def mark_preempted(self, global_step: int | None) -> None:
        """Write (or, with None, remove) OUTPUT_DIR/PREEMPTED.json. A single process exits 143 after SIGTERM, but
        `accelerate launch` with several processes reports any worker's non-zero exit as 1, like a crash; the marker
        tells a wrapper or scheduler that the run stopped on purpose with a complete checkpoint to resume from."""
        if not self.accelerator.is_main_process:
            return
        marker = Path(self.args.output_dir) / PREEMPTED_MARKER
        if global_step is None:
            marker.unlink(missing_ok=True)
            return
        marker.write_text(json.dumps({"checkpoint": f"checkpoint-{global_step}", "global_step": global_step,
                                      "exit_code": SIGTERM_EXIT_CODE, "resume": "--resume_from_checkpoint latest"}))

    def layout(self) -> dict[str, int]:
        """What the data position and the per-rank random streams of a step depend on."""
        return {"num_processes": self.accelerator.num_processes, "train_batch_size": self.args.train_batch_size,
                "gradient_accumulation_steps": self.args.gradient_accumulation_steps}

    def check_layout(self, saved: dict[str, int] | None, path: Path) -> None:
        """A checkpoint continues exactly only under the layout that wrote it: with another number of processes,
        batch or accumulation, the same global step is another place in the data and other random draws."""
        if saved is None:  # written before the layout was recorded
            logger.warning("%s does not record its processes/batch/accumulation; assuming they match this run.", path)
            return
        current = self.layout()
        if saved != current:
            def show(layout: dict[str, int]) -> str:
                return (f"{layout['num_processes']} process(es) x --train_batch_size {layout['train_batch_size']} x "
                        f"--gradient_accumulation_steps {layout['gradient_accumulation_steps']}")

            raise ValueError(f"{path} was written by {show(saved)}, but this run has {show(current)}. Resume with the "
                             "same layout to continue exactly; to fine-tune further under another layout, start a new "
                             f"run (another --output_dir) from its weights ({path}/unet or its LoRA weights).")

    def _maybe_resume(self) -> tuple[int, int, int]:
        """Returns (global_step, first_epoch, micro-batches to skip in that epoch)."""
        args = self.args
        path = _resume_path(args)
        if path is None:
            if args.resume_from_checkpoint:
                logger.warning("--resume_from_checkpoint latest: no checkpoint in %s; starting from scratch.", args.output_dir)
            return 0, 0, 0
        state = json.loads((path / "training_state.json").read_text())
        self.check_layout(state.get("layout"), path)
        self.accelerator.load_state(str(path))
        if self.ema is not None:
            self.ema.to(self.device)  # accelerate restores custom state on the CPU
        self.counters = state.get("counters", self.counters) | {}
        global_step = int(state["global_step"])
        # An epoch's last accumulation window may be short (accelerate syncs at the end of the data).
        epoch, update_in_epoch = divmod(global_step, self.updates_per_epoch)
        logger.info("Resumed from %s at step %d (epoch %d, update %d of the epoch).", path, global_step, epoch, update_in_epoch)
        return global_step, epoch, update_in_epoch * args.gradient_accumulation_steps

    # ----------------------------------------------------------------------------------------- outputs
    @contextlib.contextmanager
    def ema_weights(self):
        if self.ema is None:
            yield
            return
        self.ema.store(self.trainable_params)
        self.ema.copy_to(self.trainable_params)
        try:
            yield
        finally:
            self.ema.restore(self.trainable_params)

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int) -> list:
        generator = torch.Generator().manual_seed(seed)
        cond = self.conditioning(prompts, self.default_time_ids(len(prompts)))
        return self.decode(self.rollout(cond, generator))[0]

    def validate(self, global_step: int) -> None:
        args, acc = self.args, self.accelerator
        if not args.validation_prompt or not acc.is_main_process:
            return
        self.raw_unet.eval()
        with self.ema_weights():
            images = self.generate([args.validation_prompt] * args.num_validation_images, args.seed)
        self.raw_unet.train()
        sdxl.save_images(images, Path(args.output_dir) / "validation", f"step-{global_step:06d}")
        tracking.log_images(acc, "validation", images, [args.validation_prompt] * len(images), global_step)

    def save_final(self) -> None:
        """diffusers' output contract: a full fine-tune leaves a complete pipeline in --output_dir (the trained UNet,
        or its EMA weights with --use_ema), LoRA leaves `pytorch_lora_weights.safetensors`."""
        args, acc = self.args, self.accelerator
        if not acc.is_main_process:
            return
        out = Path(args.output_dir)
        with self.ema_weights():
            if args.use_lora:
                self._save_lora(out)
            else:
                from diffusers import StableDiffusionXLPipeline

                parts = self.parts
                pipeline = StableDiffusionXLPipeline.from_pretrained(
                    args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
                    unet=self.raw_unet, vae=parts.vae, text_encoder=parts.text_encoders[0], text_encoder_2=parts.text_encoders[1],
                    tokenizer=parts.tokenizers[0], tokenizer_2=parts.tokenizers[1],
                )
                pipeline.save_pretrained(out, safe_serialization=True)
        write_model_card(args, out, self.variant, self.num_steps)
        logger.info("Saved the trained %s to %s", "LoRA" if args.use_lora else "pipeline", out)


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


def write_model_card(args: argparse.Namespace, out: Path, variant: str, num_steps: int) -> None:
    kind = "LoRA adapters (load with `pipe.load_lora_weights(...)`)" if args.use_lora else "a complete StableDiffusionXLPipeline with the trained UNet"
    if args.use_lora:
        load = (f'pipe = StableDiffusionXLPipeline.from_pretrained("{args.pretrained_model_name_or_path}", torch_dtype=torch.float16)\n'
                f'pipe.load_lora_weights("{out}")')
    else:
        load = f'pipe = StableDiffusionXLPipeline.from_pretrained("{out}", torch_dtype=torch.float16)'
    text = f"""---
base_model: {args.pretrained_model_name_or_path}
library_name: diffusers
tags: [stable-diffusion-xl, text-to-image, diffusion-sharpening, {variant.lower()}]
---
# Diffusion-Sharpening ({variant}) fine-tune of {args.pretrained_model_name_or_path}

This folder holds {kind}, trained with {variant} Diffusion-Sharpening (arXiv 2502.12146).

| setting | value |
|---|---|
| reward | `{args.reward_model}` |
| candidates per prompt (n) | {args.num_noisy_latents} |
| steps per trajectory (m) | {num_steps} |
| DDIM grid | {args.infer_steps} steps |
| path reward | {args.path_reward} |
| optimizer steps | {args.max_train_steps} |
| learning rate | {args.learning_rate} ({args.lr_scheduler}) |
| batch | {args.train_batch_size} per device x {args.gradient_accumulation_steps} accumulation |
| resolution | {args.resolution} |
| mixed precision | {args.mixed_precision} |
| seed | {args.seed} |

```python
import torch
from diffusers import StableDiffusionXLPipeline
{load}
```
"""
    (out / "README.md").write_text(text)


def _checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


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

    def add(self, result: StepResult) -> None:
        value = float(result.loss_sum().detach())
        self.nonfinite_loss |= not math.isfinite(value)
        self.loss_sum += value
        self.num_trained += result.num_trained
        for k, v in result.logs.items():
            self.extra.setdefault(k, []).append(v)

    def logs(self) -> dict[str, float]:
        loss = self.loss_sum / self.num_trained if self.num_trained else float("nan")
        out = {"loss": loss, "trained_prompts": float(self.num_trained), "grad_norm": self.grad_norm}
        out |= {k: finite_mean(v) for k, v in self.extra.items()}
        return out
