"""Batched deterministic DDIM (eta = 0) with a timestep PER SAMPLE, and classifier-free-guided rollouts.

diffusers' `DDIMScheduler.step` takes one scalar timestep for the whole batch (the upstream release passed a
vector and crashes for n > 1: Gen-Verse/Diffusion-Sharpening, train_sft_diffusion_sharpen_sdxl.py L1087). Trajectories start at different timesteps per prompt, so we
keep the scheduler only for its noise schedule and do the DDIM update ourselves, with alpha-bar looked up per
sample and reshaped to (N, 1, 1, 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from diffusers import DDIMScheduler


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1) in `like`'s dtype and device, for broadcasting over latents."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


class DDIM:
    """The DDIM grid of `num_inference_steps` built from a diffusers scheduler config, and its batched step."""

    def __init__(self, scheduler_config: dict, num_inference_steps: int):
        # Building DDIM from SDXL's Euler config keeps timestep_spacing="leading" and steps_offset=1, so
        # 25 steps give the grid 961, 921, ..., 1 with stride 40.
        # clip_sample is a pixel-space DDIM/DDPM notion that DDIMScheduler defaults to True when a config (SDXL's
        # Euler one) lacks the key; clamping SDXL latents' x0 to [-1, 1] would be silently wrong. Honour it only
        # where the config asks for it.
        scheduler_config = {**scheduler_config, "clip_sample": bool(scheduler_config.get("clip_sample", False))}
        self.scheduler = DDIMScheduler.from_config(scheduler_config)
        if self.scheduler.config.thresholding:
            raise ValueError("DDIM thresholding is not supported by the batched sampler.")
        self.scheduler.set_timesteps(num_inference_steps)
        self.grid: torch.Tensor = self.scheduler.timesteps.clone().long()  # descending
        self.stride = self.scheduler.config.num_train_timesteps // num_inference_steps
        self.prediction_type: str = self.scheduler.config.prediction_type
        self.alphas_cumprod = self.scheduler.alphas_cumprod.double()
        self.final_alpha_cumprod = float(self.scheduler.final_alpha_cumprod)

    def alpha_bar(self, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha-bar per sample (float64); timesteps below 0 (the step after the last) use final_alpha_cumprod."""
        t = timesteps.long().cpu()
        abar = self.alphas_cumprod[t.clamp(min=0)]
        return torch.where(t >= 0, abar, torch.full_like(abar, self.final_alpha_cumprod))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        abar = self.alpha_bar(timesteps)
        return _per_sample(abar.sqrt(), x0) * x0 + _per_sample((1 - abar).sqrt(), x0) * noise

    def split_prediction(self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor):
        """Return (x0_hat, eps_hat) from the model output, whatever the prediction type."""
        abar = self.alpha_bar(timesteps)
        a, s = _per_sample(abar.sqrt(), sample), _per_sample((1 - abar).sqrt(), sample)
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (sample - s * eps) / a
        elif self.prediction_type == "v_prediction":
            x0 = a * sample - s * model_output
            eps = a * model_output + s * sample
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - a * x0) / s
        else:
            raise ValueError(f"Unknown prediction_type {self.prediction_type!r}")
        if self.scheduler.config.clip_sample:
            # As DDIMScheduler.step with its default use_clipped_model_output=False: only x0 is clamped.
            r = self.scheduler.config.clip_sample_range
            x0 = x0.clamp(-r, r)
        return x0, eps

    def step(self, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor):
        """One DDIM step (eta = 0) from per-sample `timesteps` to `timesteps - stride`. Returns (x_prev, x0_hat)."""
        x0, eps = self.split_prediction(model_output, sample, timesteps)
        abar_prev = self.alpha_bar(timesteps - self.stride)
        x_prev = _per_sample(abar_prev.sqrt(), sample) * x0 + _per_sample((1 - abar_prev).sqrt(), sample) * eps
        return x_prev, x0

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The regression target the UNet is trained on for (x0, noise) at `timesteps`."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            abar = self.alpha_bar(timesteps)
            return _per_sample(abar.sqrt(), x0) * noise - _per_sample((1 - abar).sqrt(), x0) * x0
        if self.prediction_type == "sample":
            return x0
        raise ValueError(f"Unknown prediction_type {self.prediction_type!r}")

    def exact_noise(self, x0: torch.Tensor, states: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The noise that maps x0 exactly to `states` at `timesteps`: (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
        abar = self.alpha_bar(timesteps)
        return (states - _per_sample(abar.sqrt(), states) * x0) / _per_sample((1 - abar).sqrt(), states)


@dataclass
class Conditioning:
    """SDXL conditioning for a batch: per-token embeddings, pooled embedding, add_time_ids."""

    prompt_embeds: torch.Tensor  # (N, 77, 2048)
    pooled: torch.Tensor  # (N, 1280)
    time_ids: torch.Tensor  # (N, 6)

    def repeat(self, n: int) -> "Conditioning":
        """Candidate-major repeat: row i*B + b is prompt b's candidate i."""
        return Conditioning(*(x.repeat(n, *([1] * (x.ndim - 1))) for x in self._fields()))

    def select(self, index: torch.Tensor) -> "Conditioning":
        return Conditioning(*(x[index] for x in self._fields()))

    def where(self, keep: torch.Tensor, other: "Conditioning") -> "Conditioning":
        """Row b from self where keep[b], else from other."""
        def pick(a, b):
            return torch.where(keep.to(a.device).view(-1, *([1] * (a.ndim - 1))), a, b)

        return Conditioning(*(pick(a, b) for a, b in zip(self._fields(), other._fields())))

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        return Conditioning(*(torch.cat(parts) for parts in zip(*(c._fields() for c in items))))

    def to(self, **kwargs) -> "Conditioning":
        return Conditioning(*(x.to(**kwargs) for x in self._fields()))

    def _fields(self):
        return (self.prompt_embeds, self.pooled, self.time_ids)


UNetFn = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


def unet_forward(unet) -> UNetFn:
    """Adapt an SDXL UNet to f(x, t, cond) -> model output."""

    def forward(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return unet(
            x,
            t.to(x.device),
            encoder_hidden_states=cond.prompt_embeds,
            added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids},
            return_dict=False,
        )[0]

    return forward


def guided(model: UNetFn, uncond: Conditioning | None, guidance_scale: float) -> UNetFn:
    """Classifier-free guidance: one batched call on [uncond; cond] when guidance_scale > 1."""
    if guidance_scale <= 1.0 or uncond is None:
        return model

    def forward(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        out_uncond, out_cond = model(torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([uncond, cond])).chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    return forward


@torch.no_grad()
def sample(model: UNetFn, ddim: DDIM, noise: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """Full DDIM sampling over the grid from pure noise (scaled by init_noise_sigma = 1 for DDIM)."""
    x = noise
    for t in ddim.grid:
        timesteps = t.repeat(x.shape[0])
        x, _ = ddim.step(model(x, timesteps, cond), timesteps, x)
    return x
