"""Command-line flags both scripts share, checked before anything is loaded. Names and meanings follow diffusers'
train_text_to_image_sdxl.py where they exist there."""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import torch

from .checkpoint import resume_path
from .data import DATASET_CAPTION_COLUMN

logger = logging.getLogger("sharpening")

SECRET_ARGS = ("api_key",)
# diffusers.optimization.get_scheduler's names that need no extra argument.
LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
LORA_RANK_DEFAULT, EMA_DECAY_DEFAULT = 4, 0.9999
MAX_T5_TOKENS = 512  # diffusers' SD3 and FLUX pipelines refuse longer T5 sequences


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by both scripts; names and meanings follow diffusers' train_text_to_image_sdxl.py."""
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True, help="SDXL, SD3/SD3.5 or FLUX.1 checkpoint: hub id or local folder (diffusers layout; the family is read from model_index.json).")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None, help="A better VAE, e.g. madebyollin/sdxl-vae-fp16-fix (needed to run the VAE in fp16).")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="Weight variant of the checkpoint, e.g. fp16.")
    g.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction"], help="Override the scheduler's prediction type.")
    g.add_argument("--use_lora", action="store_true",
                   help="Train LoRA adapters instead of the full denoiser: on SDXL's UNet attention, SD3's transformer "
                        "attention, FLUX.1's transformer attention and feed-forward layers.")
    g.add_argument("--lora_rank", type=int, default=LORA_RANK_DEFAULT)
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank).")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="SD3/SD3.5 and FLUX: T5 tokens of each prompt. Default: 77 for SD3 (diffusers' SD3 training scripts), "
                        "512 for FLUX.1 (FluxPipeline's and diffusers' FLUX scripts'); at most 512; evaluate with the same. SDXL has no T5: refused there.")

    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", default=None, help="Hub dataset id, a save_to_disk folder, or an imagefolder.")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_data_dir", default=None, help="Local imagefolder with metadata.jsonl or metadata.csv.")
    g.add_argument("--image_column", default="image")
    g.add_argument("--caption_column", default=None,
                   help=f"Column of captions. Default: {DATASET_CAPTION_COLUMN!r} in a dataset; in an RLHF --prompt_file the first "
                        "of prompt, prompts, text, caption. Given, that column is required.")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="Train on N rows (RLHF: prompts) drawn at random, the same N in every run (debugging, quick runs).")
    g.add_argument("--cache_dir", default=None, help="Where --dataset_name downloads are cached (models use the Hugging Face cache: HF_HOME).")
    g.add_argument("--resolution", type=int, default=1024)
    g.add_argument("--center_crop", action="store_true")
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--proportion_empty_prompts", type=float, default=0.0, help="Caption dropout of the TRAINING conditioning; rewards always score the real caption.")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--max_bad_fraction", type=float, default=0.01,
                   help="Stop when more than this share of the rows read so far was unreadable, the share judged over at least "
                        "10 / this many rows (or the whole dataset if smaller): with 0.01, more than 10 bad rows in the first 1000. "
                        "Each bad row counts once per epoch and is named in the log; 0 stops at the first bad row.")

    g = parser.add_argument_group("sharpening")
    g.add_argument("--num_noisy_latents", type=int, default=3, help="n: candidate trajectories per prompt.")
    g.add_argument("--trajectory_nums", type=int, default=3, help="m: DDIM steps (scored states) per trajectory.")
    g.add_argument("--infer_steps", type=int, default=25, help="DDIM grid size; trajectories step along it (stride 1000/infer_steps).")
    g.add_argument("--max_start_timestep", type=float, default=None,
                   help="Start trajectories only at grid timesteps <= this (default: anywhere on the grid). Later starts give "
                        "cleaner previews, whose reward predicts the finished image's better, but train only low-noise states.")
    g.add_argument("--min_start_timestep", type=float, default=None,
                   help="Start trajectories only at grid timesteps >= this (default: anywhere on the grid): train only the "
                        "high-noise states, where the layout is decided and where any end image is still reachable (best "
                        "with --path_reward final, whose scores do not rest on blurry high-noise previews).")
    g.add_argument("--path_reward", default="sum", choices=["sum", "mean", "final"],
                   help="How a candidate path is scored. sum (Eq. 8) or mean of the rewards of its m x0 previews; final: continue "
                        "each path without grad to the end of the grid and score the image it finishes at (one reward call per "
                        "path, about (grid length - start) more model calls). The endpoint targets then regress toward that "
                        "finished image instead of the last preview. Early previews are blurry, so their reward can say little "
                        "about the image a path leads to. Default: final for SFT, sum for RLHF (README \"Training targets\").")
    g.add_argument("--explore_guidance_scale", type=float, default=1.0, help="CFG during exploration (1 = conditional only, as upstream).")
    g.add_argument("--guidance_scale", type=float, default=None,
                   help="CFG of rollouts (RLHF) and validation images; default 5. FLUX.1-dev: the embedded guidance everywhere "
                        "(FluxPipeline's guidance_scale; default 3.5); see --true_cfg_scale.")
    g.add_argument("--true_cfg_scale", type=float, default=1.0,
                   help="FLUX.1 only: true classifier-free guidance of rollouts and validation images against the empty prompt "
                        "(FluxPipeline's true_cfg_scale with negative_prompt \"\"; 1 = off, one pass per step). Exploration's CFG "
                        "is --explore_guidance_scale for every family.")
    g.add_argument("--weighting_scheme", default="none", choices=["none", "logit_normal"],
                   help="Flow families (SD3, FLUX): the density of training sigmas where a loss draws fresh noise levels "
                        "(--dpo_target fresh), as diffusers' SD3/FLUX scripts: none = uniform, logit_normal = SD3's "
                        "(--logit_mean, --logit_std). Exploration states lie on the sampling grid and are unaffected.")
    g.add_argument("--loss_weighting", default="none", choices=["none", "v"],
                   help="Epsilon-prediction models (SDXL): how a state's error counts. none = the plain epsilon MSE, which counts an "
                        "x0 error at timestep t with weight SNR(t) (1/120 at t = 950: the high-noise states, where layout and "
                        "objects are decided, barely train); v = weight each state by 1 / alpha_bar_t divided by its mean over the "
                        "training timesteps (21.3 on SDXL's schedule): the v-prediction loss of the same model (Salimans & Ho "
                        "2022), which weighs x0 errors by 1 + SNR(t), closer to flow matching's (1 + sqrt(SNR))^2. Flow families "
                        "already train the velocity loss.")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="Min-SNR-gamma (Hang et al. 2023; diffusers' --snr_gamma, 5 recommended there): multiply each state's loss by "
                        "min(1, gamma / SNR(t)) (a v-prediction model: min(SNR, gamma) / (SNR + 1); an x0-prediction one: min(SNR, gamma); "
                        "as diffusers; not with --loss_weighting v, which it would override), "
                        "so that states close to the end of sampling, where an x0 error counts with a huge weight, cannot "
                        "swamp the batch. Applies to every family; off by default.")
    g.add_argument("--logit_mean", type=float, default=0.0, help="--weighting_scheme logit_normal: mean of the normal.")
    g.add_argument("--logit_std", type=float, default=1.0, help="--weighting_scheme logit_normal: std of the normal (> 0).")
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
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help='It advances on applied updates only: a skipped update (no reward ranking, '
                   'non-finite, fp16 overflow, which diffusers skips too) counts toward --max_train_steps, not the schedule.')
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (CUDA).")
    # Paper A.3: AdamW with betas (0, 0.99) and no weight decay.
    g.add_argument("--adam_beta1", type=float, default=0.0)
    g.add_argument("--adam_beta2", type=float, default=0.99)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--use_ema", action="store_true")
    g.add_argument("--ema_decay", type=float, default=EMA_DECAY_DEFAULT)
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--cudnn_attention", action="store_true",
                   help="Let PyTorch's SDPA use cuDNN's attention kernels on CUDA. Off by default: on torch 2.11 (H200) their bf16 "
                        "backward gave non-finite gradients when training FLUX (scripts/flux_cuda_probe.py).")
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
    g.add_argument("--log_trajectories_prompts", type=int, default=2,
                   help="Prompts of the micro-batch shown in each trajectory log (0: reward histograms only).")


def refuse_unused_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, flags: list[str], why: str) -> None:
    """parser.error naming every flag of `flags` set to other than its default: here it would do nothing."""
    changed = [f"--{flag}" for flag in flags if getattr(args, flag) != parser.get_default(flag)]
    if changed:
        parser.error(f"{', '.join(changed)}: {why}; drop {'them' if len(changed) > 1 else 'it'}.")


def named_trackers(report_to: str | None) -> list[str]:
    """The trackers --report_to names ("tensorboard,wandb" names two); none for "none" or "all"."""
    return [] if report_to in (None, "all", "none", "") else [name.strip() for name in report_to.split(",")]


def check_output_folder(output_dir: str) -> None:
    """--output_dir is created where missing; a file there cannot hold the outputs."""
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file; give a folder.")


def validate_training_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Everything that can be checked before a model is loaded; a bad value is a usage error (argparse's message
    and exit status 2), not a traceback."""
    try:
        _check_training_args(args)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    _refuse_flags_this_run_does_not_use(parser, args)


def _refuse_flags_this_run_does_not_use(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that shape something the other flags switch off (validation, the logit-normal density, trajectory logs)."""
    if not args.validation_prompt:
        refuse_unused_flags(parser, args, ["validation_epochs", "validation_steps", "num_validation_images"],
                            "validation images are drawn only for --validation_prompt (add one)")
    if args.weighting_scheme != "logit_normal":
        refuse_unused_flags(parser, args, ["logit_mean", "logit_std"], "read only by --weighting_scheme logit_normal (add it; "
                            "without it the training sigmas are drawn uniformly)")
    if args.log_trajectories_every == 0 or (args.report_to != "all" and not named_trackers(args.report_to)):
        refuse_unused_flags(parser, args, ["log_trajectories_prompts"], "the trajectory logs it shapes go to the trackers every "
                            "--log_trajectories_every steps, and this run writes none (--report_to none or --log_trajectories_every 0)")


def _check_training_args(args: argparse.Namespace) -> None:
    from reward import check_reward_flags_used, validate_reward_args

    # --reward_plugin files were imported by add_reward_args, before parsing, so their rewards and flags exist.
    validate_reward_args(args)  # the spec, and what each reward needs (weights path, grader key)
    check_reward_flags_used(args, [args.reward_model])
    if args.num_noisy_latents < 1 or args.trajectory_nums < 1:
        raise ValueError("--num_noisy_latents and --trajectory_nums must be >= 1.")
    if not 1 <= args.infer_steps <= 1000:
        raise ValueError("--infer_steps must be between 1 and 1000.")
    for flag in ("checkpointing_steps", "validation_epochs", "max_nonfinite_steps", "max_train_steps", "num_train_epochs",
                 "train_batch_size", "gradient_accumulation_steps", "lora_rank", "num_validation_images",
                 "checkpoints_total_limit", "validation_steps", "max_train_samples"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1.")
    for flag in ("max_grad_norm", "lr_warmup_steps", "adam_weight_decay", "dataloader_num_workers", "log_trajectories_every",
                 "log_trajectories_prompts"):
        if getattr(args, flag) < 0:  # a negative --max_grad_norm made clip_grad_norm_ flip every gradient's sign
            raise ValueError(f"--{flag} must be >= 0" + (" (0: no clipping)." if flag == "max_grad_norm" else "."))
    for flag in ("min_start_timestep", "max_start_timestep"):
        if getattr(args, flag) is not None and not 0 <= getattr(args, flag) <= 1000:
            raise ValueError(f"--{flag} must be a timestep in [0, 1000].")
    if None not in (args.min_start_timestep, args.max_start_timestep) and args.min_start_timestep > args.max_start_timestep:
        raise ValueError(f"--min_start_timestep {args.min_start_timestep:g} is above --max_start_timestep {args.max_start_timestep:g}: "
                         "no grid timestep lies between them; swap them.")
    if not args.logit_std > 0:
        raise ValueError("--logit_std must be > 0.")
    if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= MAX_T5_TOKENS:
        raise ValueError(f"--max_sequence_length must be between 1 and {MAX_T5_TOKENS} (StableDiffusion3Pipeline and FluxPipeline "
                         "refuse more, so the trained model could not be sampled with it).")
    if args.lr_warmup_steps > 0 and args.lr_scheduler == "constant":  # diffusers' "constant" ignores the warmup
        raise ValueError(f"--lr_warmup_steps {args.lr_warmup_steps} has no effect with --lr_scheduler constant: use "
                         "--lr_scheduler constant_with_warmup (or linear, cosine, ...), or drop the warmup.")
    if not args.learning_rate > 0:
        raise ValueError("--learning_rate must be > 0.")
    if not (0.0 <= args.adam_beta1 < 1.0 and 0.0 <= args.adam_beta2 < 1.0) or not args.adam_epsilon > 0:
        raise ValueError("--adam_beta1 and --adam_beta2 must be in [0, 1), --adam_epsilon > 0.")
    if not 0.0 <= args.ema_decay <= 1.0:
        raise ValueError("--ema_decay must be in [0, 1].")
    if args.seed is not None and args.seed < 0:
        raise ValueError("--seed must be >= 0 (it seeds numpy's and torch's generators).")
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        raise ValueError("--max_bad_fraction must be in [0, 1] (0: stop at the first unreadable row).")
    if not args.use_lora and (args.lora_rank != LORA_RANK_DEFAULT or args.lora_alpha is not None):
        raise ValueError("--lora_rank / --lora_alpha shape LoRA adapters: add --use_lora, or drop them (without it the "
                         "whole denoiser trains, at a LoRA learning rate if you chose one).")
    if not args.use_ema and args.ema_decay != EMA_DECAY_DEFAULT:
        raise ValueError("--ema_decay needs --use_ema (without it no average is kept); add it or drop --ema_decay.")
    if args.snr_gamma is not None and not args.snr_gamma > 0:
        raise ValueError("--snr_gamma must be > 0 (5 is the Min-SNR paper's choice); leave it out for no capping.")
    if args.snr_gamma is not None and args.loss_weighting != "none":
        # Min-SNR sets each state's x0 weight to min(SNR, gamma) whatever the loss is on: the v weighting would only
        # divide the loss by its mean weight (21.3 on SDXL's schedule), which acts as a smaller learning rate.
        raise ValueError("--snr_gamma fixes each state's weight at min(SNR, gamma) for any loss, so --loss_weighting v would only "
                         "scale the loss down: use one of the two.")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise ValueError("--proportion_empty_prompts must be in [0, 1].")
    if args.decode_batch_size is not None and args.decode_batch_size < 1:
        raise ValueError("--decode_batch_size must be >= 1 (or left out for the resolution's default).")
    check_output_folder(args.output_dir)
    if args.resolution < 8 or args.resolution % 8:
        raise ValueError("--resolution must be a positive multiple of 8.")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise ValueError("--lora_alpha must be > 0 (leave it out for alpha = rank).")
    for tracker in named_trackers(args.report_to):
        if tracker in ("wandb", "tensorboard", "comet_ml", "mlflow", "aim", "clearml", "dvclive") and importlib.util.find_spec(tracker) is None:
            # accelerate only warns and trains on with no tracking at all
            raise ValueError(f"--report_to {tracker}: the package is not installed; `pip install {tracker}`, or use "
                             "--report_to tensorboard / none.")
    if args.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ValueError("--enable_xformers_memory_efficient_attention needs `pip install xformers` (CUDA only); without the flag PyTorch SDPA is used.") from None
        if not torch.cuda.is_available():
            raise ValueError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; drop the flag on CPU (SDPA is used).")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed_precision fp16 needs a CUDA GPU (the CPU's half-precision matmuls fail on the first step); "
                         "use --mixed_precision no or bf16 on CPU.")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("--use_8bit_adam needs `pip install bitsandbytes`.") from None
        if not torch.cuda.is_available():
            raise ValueError("--use_8bit_adam needs a CUDA GPU (bitsandbytes 8-bit optimizers); drop the flag on CPU.")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest" and not resume_path(args).is_dir():
        raise ValueError(
            f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is neither a folder nor a checkpoint in --output_dir (use 'latest' or checkpoint-N)."
        )
    args.seed = _resolve_seed(args)


def _resolve_seed(args: argparse.Namespace) -> int:
    """A resumed run takes its checkpoint's seed (that is what makes it continue exactly); a run without
    --seed gets a random one, recorded in its checkpoints and tracker config."""
    path = resume_path(args)
    if path is not None:
        saved = json.loads((path / "training_state.json").read_text())["seed"]
        if args.seed is not None and args.seed != saved:
            logger.warning("Resuming with the checkpoint's seed %d instead of --seed %d, so the run continues exactly.", saved, args.seed)
        return int(saved)
    if args.seed is None:
        return int(np.random.SeedSequence().generate_state(1)[0] % (2**31))
    return args.seed


def secret_flag_names(args: argparse.Namespace) -> tuple[str, ...]:
    """The flags that hold credentials: ours, and any a --reward_plugin declares with type=Secret (rewards.base)."""
    from rewards.base import Secret

    return tuple(dict.fromkeys([*SECRET_ARGS, *(name for name, value in vars(args).items() if isinstance(value, Secret))]))


def redacted_argv(argv: list[str], secret_names: tuple[str, ...] = SECRET_ARGS) -> list[str]:
    """The command line with secret values replaced by ***: wandb records sys.argv in its run metadata (the run's
    "Command"), beside the config public_config cleans. argparse also accepts a flag's unique prefix (--api_k)."""
    secret_flags = [f"--{name}" for name in secret_names]

    def abbreviates(flag: str, full: str) -> bool:
        return len(flag) > 2 and full.startswith(flag)

    def is_secret(flag: str) -> bool:
        return any(abbreviates(flag, secret) for secret in secret_flags)

    from reward import strip_userinfo

    out, next_value = [], None  # next_value: how to clean the value that follows a bare --api_key or --base_url
    for arg in argv:
        if next_value is not None:
            out.append(next_value(arg))
            next_value = None
            continue
        flag, eq, value = arg.partition("=")
        clean = (lambda _: "***") if is_secret(flag) else strip_userinfo if abbreviates(flag, "--base_url") else None
        if clean is None:
            out.append(arg)
        elif eq:
            out.append(f"{flag}={clean(value)}")
        else:
            out.append(arg)
            next_value = clean
    return out


def public_config(args: argparse.Namespace) -> dict:
    """Flags as tracker config / model card data: secrets removed, values made JSON-friendly."""
    out = {}
    for key, value in vars(args).items():
        if key in secret_flag_names(args):
            continue
        out[key] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    if out.get("base_url"):
        from reward import strip_userinfo

        out["base_url"] = strip_userinfo(out["base_url"])  # a token in user:pass@host is a secret too
    return out
