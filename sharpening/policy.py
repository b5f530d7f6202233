"""The trained denoiser and what comes with it: which weights train (full or LoRA), their precision, the frozen
reference of the RLHF log-ratio, and EMA."""
from __future__ import annotations

import argparse
import contextlib
import copy
import torch

from .sampler import ModelFn


class Policy:
    """Holds the denoiser (`raw_unet`; after `prepare`, also the accelerate-wrapped `unet` the grad call goes
    through), its trainable parameters, the reference and the EMA. `family` is the model family's module
    (sharpening.sdxl): it adapts the denoiser to f(x, t, cond) and names the LoRA target modules."""

    def __init__(self, unet, family, args: argparse.Namespace, accelerator, weight_dtype: torch.dtype, needs_reference: bool):
        self.family, self.accelerator = family, accelerator
        device = accelerator.device
        if args.enable_xformers_memory_efficient_attention:
            unet.enable_xformers_memory_efficient_attention()
        self.reference_unet = None
        if args.use_lora:
            from peft import LoraConfig

            unet.requires_grad_(False).to(device, dtype=weight_dtype)
            # peft draws the gaussian lora_A from torch's global generator, which nothing else seeds (torch seeds each
            # process at random): seeded here, two runs with one --seed start from the same adapters.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank,
                                            init_lora_weights="gaussian", target_modules=family.LORA_TARGET_MODULES))
            for p in unet.parameters():  # adapters train in fp32 even when the base runs in half precision
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            unet.requires_grad_(True).to(device, dtype=torch.float32)
            if needs_reference:
                # Frozen base model for the RLHF log-ratio (with LoRA the same UNet with adapters off serves), in
                # the policy's dtype: a half-precision copy would differ from the fp32 policy under autocast, so the
                # DPO logits would not start at 0 and beta (2500) would turn that rounding into a random preference.
                # Its weights keep requires_grad as the policy's do (it only runs under no_grad and no optimizer holds
                # them): under CPU bf16 autocast (torch 2.14) a Linear whose weight requires grad rounds differently
                # from one whose weight does not (measured: 2.4e-4 on identical inputs and weights).
                self.reference_unet = copy.deepcopy(unet).eval()
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        self.unet = self.raw_unet = unet
        self.trainable_params = [p for p in unet.parameters() if p.requires_grad]

        self.ema = None
        if args.use_ema:
            from diffusers.training_utils import EMAModel

            if args.use_lora:  # EMA of the adapters: checkpointed with accelerate's custom state
                self.ema = EMAModel(self.trainable_params, decay=args.ema_decay)
            else:  # EMA of the whole UNet: checkpointed as a loadable `unet_ema/`, as diffusers' scripts do
                self.ema = EMAModel(self.trainable_params, decay=args.ema_decay, model_cls=type(unet), model_config=unet.config)
            self.ema.to(device)

    def prepare(self, optimizer, lr_scheduler):
        """accelerate.prepare the denoiser with its optimizer and schedule (DDP wrapping, mixed precision)."""
        self.unet, optimizer, lr_scheduler = self.accelerator.prepare(self.raw_unet, optimizer, lr_scheduler)
        self.raw_unet = self.accelerator.unwrap_model(self.unet)
        return optimizer, lr_scheduler

    def forward(self, grad: bool) -> ModelFn:
        """f(x, t, cond) of the trained denoiser: the DDP-wrapped module for the one grad call of a step, the bare
        module for no-grad exploration (no DDP bookkeeping)."""
        call = self.family.forward(self.unet if grad else self.raw_unet)

        def autocast_call(x, t, cond):
            with self.accelerator.autocast():
                return call(x, t, cond)

        return autocast_call

    @torch.no_grad()
    def reference(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The frozen base model, run exactly as the policy runs (same weights dtype, inputs and autocast): a copy for
        full fine-tuning, the same denoiser with adapters off for LoRA."""
        if self.reference_unet is not None:
            with self.accelerator.autocast():
                return self.family.forward(self.reference_unet)(x, t, cond)
        self.raw_unet.disable_adapters()
        try:
            with self.accelerator.autocast():
                return self.family.forward(self.raw_unet)(x, t, cond)
        finally:
            self.raw_unet.enable_adapters()

    @contextlib.contextmanager
    def ema_weights(self):
        """Within the block the trainable weights hold their EMA (no-op without --use_ema)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.trainable_params)
        self.ema.copy_to(self.trainable_params)
        try:
            yield
        finally:
            self.ema.restore(self.trainable_params)
