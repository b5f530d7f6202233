"""Checkpoints, resume, preemption and the final export, in diffusers' layout.

A checkpoint is also a usable model: a full fine-tune holds a loadable `unet/` (SDXL) or `transformer/` (SD3), and
`unet_ema/` / `transformer_ema/` with --use_ema,
LoRA `pytorch_lora_weights.safetensors`; accelerate's optimizer, scheduler and RNG state sit beside them, with
`training_state.json` (step, seed, counters, running sums and the layout the data position depends on).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

import torch

logger = logging.getLogger("sharpening")

SIGTERM_EXIT_CODE = 143
PREEMPTED_MARKER = "PREEMPTED.json"


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint-<step> folder."""
    return int(path.name.split("-")[-1])


def list_checkpoints(folder: Path) -> list[Path]:
    """checkpoint-<step> folders of `folder`, oldest first."""
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=checkpoint_step)


def resume_path(args: argparse.Namespace) -> Path | None:
    """The checkpoint --resume_from_checkpoint names ("latest": the newest in --output_dir), or None."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(Path(args.output_dir))
        return found[-1] if found else None
    path = Path(args.resume_from_checkpoint)
    # As in diffusers, a bare checkpoint name means the one inside --output_dir.
    return path if path.is_dir() else Path(args.output_dir) / path


RESTORED_OPTIMISATION_FLAGS = ("learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2",
                               "adam_weight_decay", "adam_epsilon", "use_8bit_adam")


def check_fresh_output_dir(args: argparse.Namespace) -> None:
    """A run that does not resume must not start among another run's checkpoint-N folders: its own would replace
    theirs at equal steps, --checkpoints_total_limit would prune its own newest first (theirs have higher steps), and
    `--resume_from_checkpoint latest` after a preemption would continue theirs."""
    if args.resume_from_checkpoint:
        return
    found = list_checkpoints(Path(args.output_dir))
    if found:
        names = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise ValueError(f"--output_dir {args.output_dir} already holds another run's checkpoints ({names}): continue that run with "
                         "--resume_from_checkpoint latest, or start this one in another --output_dir (or delete them).")


def sync_path(path: Path) -> None:
    """fsync one file or folder (a folder's entries: renames, new files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders themselves, deepest first."""
    for root, _, files in sorted(os.walk(folder), key=lambda entry: -entry[0].count(os.sep)):
        for name in files:
            sync_path(Path(root) / name)
        sync_path(Path(root))


class Checkpoints:
    """Saving and restoring a run's state through accelerate, for the trained `policy` of model `family`."""

    def __init__(self, args: argparse.Namespace, accelerator, policy, family):
        self.args, self.accelerator, self.policy, self.family = args, accelerator, policy, family
        if accelerator.is_main_process:  # a save killed before its rename; nothing else reads or removes these
            for stale in Path(args.output_dir).glob(".tmp-checkpoint-*"):
                logger.warning("Removing %s, an unfinished checkpoint of an earlier run that was stopped while saving it.", stale)
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)
        if policy.ema is not None and args.use_lora:
            accelerator.register_for_checkpointing(policy.ema)

    # ----------------------------------------------------------------------------------------- accelerate hooks
    def _save_hook(self, models, weights, output_dir) -> None:
        for model in models:
            if self.accelerator.is_main_process:
                if self.args.use_lora:
                    self.family.save_lora(self.policy.raw_unet, Path(output_dir))
                else:
                    denoiser = self.family.DENOISER
                    self.accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, denoiser), safe_serialization=True)
                    if self.policy.ema is not None:
                        self.policy.ema.save_pretrained(os.path.join(output_dir, f"{denoiser}_ema"))
            if weights:
                weights.pop()

    def _load_hook(self, models, input_dir) -> None:
        model = self.accelerator.unwrap_model(models.pop())
        ema = self.policy.ema
        if self.args.use_lora:
            state = self.family.lora_state(Path(input_dir))
        else:
            denoiser = self.family.DENOISER
            if not (Path(input_dir) / denoiser / "config.json").is_file():
                raise ValueError(f"Checkpoint {input_dir} holds no {denoiser}/: was it made by a LoRA run (then add --use_lora)?")
            state = type(model).from_pretrained(input_dir, subfolder=denoiser).state_dict()
            if ema is not None:
                from diffusers.training_utils import EMAModel

                ema.load_state_dict(EMAModel.from_pretrained(os.path.join(input_dir, f"{denoiser}_ema"), type(model)).state_dict())
                ema.to(self.accelerator.device)
        # A saved model also holds its buffers (SD3's positional embedding): restore them, compare only the weights.
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        expected = {k for k, v in model.named_parameters() if v.requires_grad}
        weights = set(state) - {k for k, _ in model.named_buffers()}
        if weights != expected:
            raise ValueError(
                f"Checkpoint {input_dir} does not match this run's trainable weights "
                f"({len(weights - expected)} unexpected, {len(expected - weights)} missing): was it made with the same --use_lora/--lora_rank?"
            )
        with torch.no_grad():
            for k, v in state.items():
                tensors[k].copy_(v)

    # ----------------------------------------------------------------------------------------- save, prune, resume
    def save(self, global_step: int, counters: dict, running: dict) -> None:
        """checkpoint-<step> written atomically: into a temp folder, renamed when complete; pruning only after."""
        acc, out = self.accelerator, Path(self.args.output_dir)
        final, tmp = out / f"checkpoint-{global_step}", out / f".tmp-checkpoint-{global_step}"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # every rank takes part
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {"global_step": global_step, "seed": self.args.seed, "counters": counters, "running": running, "layout": self.layout(),
                     "optimisation": self.optimisation()}
            (tmp / "training_state.json").write_text(json.dumps(state, indent=2))
            sync_tree(tmp)  # on disk before the rename makes it a checkpoint: a machine crash must not leave half of one
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            sync_path(out)  # the rename itself
            logger.info("Saved %s", final)
            self._prune()
        acc.wait_for_everyone()

    def _prune(self) -> None:
        limit = self.args.checkpoints_total_limit
        if not limit:
            return
        for old in list_checkpoints(Path(self.args.output_dir))[:-limit]:
            logger.info("Removing old checkpoint %s (--checkpoints_total_limit=%d)", old, limit)
            shutil.rmtree(old)

    def layout(self) -> dict[str, int]:
        """What the data position and the per-rank random streams of a step depend on."""
        return {"num_processes": self.accelerator.num_processes, "train_batch_size": self.args.train_batch_size,
                "gradient_accumulation_steps": self.args.gradient_accumulation_steps}

    def optimisation(self) -> dict:
        """The flags whose values a resume cannot change: accelerate restores the optimizer's param groups (learning
        rate, betas, weight decay, eps), the schedule's base rates and the EMA's decay from the checkpoint."""
        args, names = self.args, list(RESTORED_OPTIMISATION_FLAGS)
        if args.use_ema:
            names.append("ema_decay")
        if args.lr_scheduler not in ("constant", "constant_with_warmup"):
            # the schedule's shape is laid out over the run's length: the restored step counter on another length
            # jumps the rate (cosine, 90 of 100 steps: 2.4 % of the peak; resumed for 200 steps: 57 %)
            names.append("max_train_steps")
        return {name: getattr(args, name) for name in names}

    def check_optimisation(self, saved: dict | None, path: Path) -> None:
        changed = {name: value for name, value in (saved or {}).items() if self.optimisation().get(name, value) != value}
        if changed:
            said = ", ".join(f"--{name} {getattr(self.args, name)} (checkpoint: {value})" for name, value in changed.items())
            if "max_train_steps" in changed:
                said += (f" (with --num_train_epochs, the length it gives), while its --lr_scheduler {self.args.lr_scheduler} "
                         "was laid out over the checkpoint's length")
            raise ValueError(f"This run says {said}, but resuming from {path} restores the checkpoint's values with the optimizer "
                             "and its schedule, so the flags would be ignored. Resume with the checkpoint's values to continue "
                             "exactly, or start a new run with the new values in another --output_dir (there is no flag to "
                             "start from a checkpoint's weights with a fresh optimizer).")

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
                             f"run (another --output_dir) from its weights ({path}/{self.family.DENOISER} or its LoRA weights).")

    def resume(self) -> tuple[int, dict, dict] | None:
        """Restore the checkpoint --resume_from_checkpoint names: (its global step, its counters, the trainer's running
        sums), or None."""
        args = self.args
        path = resume_path(args)
        if path is None:
            if args.resume_from_checkpoint:
                logger.warning("--resume_from_checkpoint latest: no checkpoint in %s; starting from scratch.", args.output_dir)
            return None
        state = json.loads((path / "training_state.json").read_text())
        self.check_layout(state.get("layout"), path)
        self.check_optimisation(state.get("optimisation"), path)
        self.accelerator.load_state(str(path))
        self._set_aside_newer_checkpoints(int(state["global_step"]))  # only once the older state has loaded
        if self.policy.ema is not None:
            self.policy.ema.to(self.accelerator.device)  # accelerate restores custom state on the CPU
        logger.info("Resumed from %s at step %d.", path, int(state["global_step"]))
        return int(state["global_step"]), state.get("counters", {}), state.get("running", {})

    def _set_aside_newer_checkpoints(self, step: int) -> None:
        """Resuming from an older checkpoint (a rollback) abandons the newer ones: left in place, `latest` (and the
        preemption marker's requeue) would resume them instead of this run, and --checkpoints_total_limit would prune
        this run's own checkpoints first. They are renamed abandoned-after-<step>-checkpoint-<N>, not deleted."""
        newer = [p for p in list_checkpoints(Path(self.args.output_dir)) if checkpoint_step(p) > step]
        if newer and self.accelerator.is_main_process:
            for old in newer:
                aside, again = old.with_name(f"abandoned-after-{step}-{old.name}"), 1
                while aside.exists():  # an earlier rollback to the same step set its own branch aside
                    again += 1
                    aside = old.with_name(f"abandoned-after-{step}-{old.name}-{again}")
                old.rename(aside)
            logger.warning("Resuming at step %d: set aside the newer %s (renamed abandoned-after-%d-...), so that "
                           "`latest` and checkpoint pruning follow this run.", step, ", ".join(p.name for p in newer), step)
        self.accelerator.wait_for_everyone()

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

    # ----------------------------------------------------------------------------------------- final export
    def save_final(self, parts, variant: str, num_steps: int) -> None:
        """diffusers' output contract: a full fine-tune leaves a complete pipeline in --output_dir (the trained UNet,
        or its EMA weights with --use_ema), LoRA leaves `pytorch_lora_weights.safetensors`."""
        args = self.args
        if not self.accelerator.is_main_process:
            return
        out = Path(args.output_dir)
        with self.policy.ema_weights():
            if args.use_lora:
                self.family.save_lora(self.policy.raw_unet, out)
            else:
                self.family.save_pipeline(parts, self.policy.raw_unet, args.pretrained_model_name_or_path, out, args.revision,
                                          args.variant, args.pretrained_vae_model_name_or_path)
        write_model_card(args, out, variant, num_steps, self.family.PIPELINE_CLASS)
        logger.info("Saved the trained %s to %s", "LoRA" if args.use_lora else "pipeline", out)


MODEL_CARD_TAGS = {"StableDiffusionXLPipeline": "stable-diffusion-xl", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def write_model_card(args: argparse.Namespace, out: Path, variant: str, num_steps: int, pipeline_class: str) -> None:
    kind = "LoRA adapters (load with `pipe.load_lora_weights(...)`)" if args.use_lora else f"a complete {pipeline_class} with the trained denoiser"
    # Sampled in the precision it was trained in (args.mixed_precision is what the Accelerator used, set by the flag,
    # `accelerate launch` or its config); FLUX.1's activations overflow fp16, so it never gets fp16.
    dtype = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}.get(args.mixed_precision, "torch.float32")
    if pipeline_class == "FluxPipeline" and dtype == "torch.float16":
        dtype = "torch.bfloat16"
    where = json.dumps(str(Path(out).resolve()))  # from anywhere, not only from the folder the run started in
    imports = f"import torch\nfrom diffusers import {pipeline_class}"
    if args.use_lora:
        # The base exactly as trained on: its revision and weight variant, and a replacement VAE if one was used.
        extra = "".join(f", {name}={json.dumps(value)}" for name, value in (("revision", args.revision), ("variant", args.variant)) if value)
        if args.pretrained_vae_model_name_or_path:
            imports = f"import torch\nfrom diffusers import AutoencoderKL, {pipeline_class}"
            extra += f", vae=AutoencoderKL.from_pretrained({json.dumps(args.pretrained_vae_model_name_or_path)}, dtype={dtype})"
        load = (f"pipe = {pipeline_class}.from_pretrained({json.dumps(args.pretrained_model_name_or_path)}{extra}, dtype={dtype})\n"
                f"pipe.load_lora_weights({where})")
        if getattr(args, "prediction_type", None):  # the adapters were trained for it; the base's scheduler may say otherwise
            load += f'\npipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, prediction_type="{args.prediction_type}")'
    else:
        load = f"pipe = {pipeline_class}.from_pretrained({where}, dtype={dtype})"
    # SD3 / FLUX: the T5 length the denoiser was trained with (FLUX has no text mask: sample with the same).
    tokens = getattr(args, "max_sequence_length", None)
    t5 = tokens is not None and pipeline_class != "StableDiffusionXLPipeline"
    card_rows = f"\n| T5 tokens (max_sequence_length) | {tokens} |" if t5 else ""
    # At the resolution, T5 length and guidance it was trained and validated with (StableDiffusion3Pipeline's own defaults
    # are 256 tokens and CFG 7; FluxPipeline's true CFG is off unless asked for).
    settings = [f"height={args.resolution}", f"width={args.resolution}"] + ([f"max_sequence_length={tokens}"] if t5 else [])
    if args.guidance_scale is not None:
        settings.append(f"guidance_scale={args.guidance_scale:g}")
    true_cfg = getattr(args, "true_cfg_scale", 1.0)
    if pipeline_class == "FluxPipeline" and true_cfg != 1.0:
        settings += [f"true_cfg_scale={true_cfg:g}", 'negative_prompt=""']
        card_rows += f"\n| true CFG scale (against the empty prompt) | {true_cfg:g} |"
    call = f'image = pipe("your prompt", {", ".join(settings)}).images[0]'
    text = f"""---
base_model: {json.dumps(str(args.pretrained_model_name_or_path))}
library_name: diffusers
tags: [{MODEL_CARD_TAGS.get(pipeline_class, "diffusers")}, text-to-image, diffusion-sharpening, {variant.lower()}]
---
# Diffusion-Sharpening ({variant}) fine-tune of {args.pretrained_model_name_or_path}

This folder holds {kind}, trained with {variant} Diffusion-Sharpening (arXiv 2502.12146).

| setting | value |
|---|---|
| reward | `{args.reward_model}` |
| candidates per prompt (n) | {args.num_noisy_latents} |
| steps per trajectory (m) | {num_steps} |
| sampling grid | {args.infer_steps} steps |
| path reward | {args.path_reward} |
| optimizer steps | {args.max_train_steps} |
| learning rate | {args.learning_rate} ({args.lr_scheduler}) |
| batch | {args.train_batch_size} per device x {args.gradient_accumulation_steps} accumulation |
| resolution | {args.resolution} |
| guidance scale (rollouts, validation) | {args.guidance_scale} |{card_rows}
| mixed precision | {args.mixed_precision} |
| seed | {args.seed} |

```python
{imports}
{load}
{call}
```
"""
    (out / "README.md").write_text(text)
