"""Samplers on a fixed grid, stepped with a position PER SAMPLE, and classifier-free-guided rollouts.

A `Sampler` is what exploration, the training targets and rollouts need from a noise schedule. Positions on its
grid are INDICES (0 = the noisiest state): `grid[k]` is the timestep the model is called with at index k, and a
step goes from index k to k + 1. Nothing outside a sampler does arithmetic on timesteps, so a schedule whose time
is not an integer (flow matching's sigma) or whose grid is not evenly spaced plugs into the same loops.

`DDIM` is the sampler of the SDXL family. diffusers' `DDIMScheduler.step` takes one scalar timestep for the whole
batch (the upstream release passed a vector and crashes for n > 1: Gen-Verse/Diffusion-Sharpening,
train_sft_diffusion_sharpen_sdxl.py L1087). Trajectories start at different positions per prompt, so we keep the
scheduler only for its noise schedule and do the DDIM update ourselves, with alpha-bar looked up per sample and
reshaped to (N, 1, 1, 1).
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from diffusers import DDIMScheduler

# f(x, t, cond) -> model output, for a batch of states x at per-row timesteps t under conditioning cond (whatever
# the model family encodes a prompt as; it needs `cat` for classifier-free guidance).
ModelFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


class Sampler(Protocol):
    grid: torch.Tensor  # (K,) model timesteps, noisiest first

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t of clean latents x0 and noise at per-row timesteps (any value in the training range, on the grid or not)."""

    def step(self, model_output: torch.Tensor, index: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One deterministic step from per-row grid `index` to index + 1 (past the last index: the clean end).
        Returns (x_next, x0_hat)."""

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The model-output regression target for (x0, noise) at `timesteps`."""

    def exact_noise(self, x0: torch.Tensor, states: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The noise that, with x0, gives exactly `states` at `timesteps` (add_noise's inverse in the noise)."""

    def draw_train_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` timesteps from the distribution the model was trained on (the ordinary diffusion loss)."""

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio of the states at `timesteps` (float64): (signal scale / noise scale)^2."""


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
        spacing, train_steps = self.scheduler.config.timestep_spacing, self.scheduler.config.num_train_timesteps
        if int(self.grid.max()) >= train_steps:
            raise ValueError(f"{num_inference_steps} DDIM steps with timestep_spacing {spacing!r} and steps_offset "
                             f"{self.scheduler.config.steps_offset} start at t = {int(self.grid.max())}, past the schedule's "
                             f"{train_steps} timesteps: use fewer steps.")
        if len(self.grid) > 1 and bool((self.grid[:-1] - self.grid[1:] != self.stride).any()):
            # DDIMScheduler steps every state to t - stride; on this grid that is not the next grid point, so each
            # explored state would be labelled (and trained) with another timestep than the one it is at.
            fix = ("set timestep_spacing to 'leading' or 'trailing' in the checkpoint's scheduler/scheduler_config.json"
                   if spacing == "linspace" else
                   f"use a number of steps (--infer_steps, evaluate's --steps) that divides {train_steps}, e.g. "
                   f"{[k for k in (10, 20, 25, 40, 50) if train_steps % k == 0]}")
            raise ValueError(f"{num_inference_steps} DDIM steps with timestep_spacing {spacing!r} give a grid not spaced by "
                             f"{train_steps} // {num_inference_steps} = {self.stride} ({self.grid[:4].tolist()}...), which "
                             f"diffusers' DDIM steps by: {fix}.")
        self.prediction_type: str = self.scheduler.config.prediction_type
        self.alphas_cumprod = self.scheduler.alphas_cumprod.double()
        self.final_alpha_cumprod = float(self.scheduler.final_alpha_cumprod)

    def alpha_bar(self, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha-bar per sample (float64); timesteps below 0 (the step after the last) use final_alpha_cumprod."""
        t = timesteps.long().cpu()
        abar = self.alphas_cumprod[t.clamp(min=0)]
        return torch.where(t >= 0, abar, torch.full_like(abar, self.final_alpha_cumprod))

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha_bar / (1 - alpha_bar)."""
        abar = self.alpha_bar(timesteps)
        return abar / (1 - abar)

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

    def step(self, model_output: torch.Tensor, index: torch.Tensor, sample: torch.Tensor):
        """One DDIM step (eta = 0) from per-sample grid `index`. Returns (x_prev, x0_hat)."""
        return self.step_at(model_output, self.grid[index.long().cpu()], sample)

    def step_at(self, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor):
        """One DDIM step (eta = 0) from per-sample `timesteps` to `timesteps - stride`, as DDIMScheduler.step computes
        the previous timestep (on the "leading" and "trailing" grids that is the next grid point; past the last
        one, final_alpha_cumprod). Returns (x_prev, x0_hat)."""
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

    def v_loss_weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample factor that turns the MSE of this model's output into the MSE of v = sqrt(abar) eps - sqrt(1 - abar) x0
        at the same state (float64): 1 / abar for epsilon, 1 / (1 - abar) for sample, 1 for v-prediction."""
        abar = self.alpha_bar(timesteps)
        return {"epsilon": 1 / abar, "sample": 1 / (1 - abar), "v_prediction": torch.ones_like(abar)}[self.prediction_type]

    def mean_v_loss_weight(self) -> float:
        """v_loss_weight averaged over the training timesteps 0..T-1: a fixed normaliser (21.3 on SDXL's schedule), so
        that the weighted loss keeps the plain loss's overall scale while a state's weight depends on its timestep only."""
        return float(self.v_loss_weight(torch.arange(self.scheduler.config.num_train_timesteps)).mean())

    def exact_noise(self, x0: torch.Tensor, states: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The noise that maps x0 exactly to `states` at `timesteps`: (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
        abar = self.alpha_bar(timesteps)
        return (states - _per_sample(abar.sqrt(), states) * x0) / _per_sample((1 - abar).sqrt(), states)

    def draw_train_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Uniform integers in [0, num_train_timesteps), as the ordinary diffusion loss (and Diffusion-DPO) draws them."""
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (count,), generator=generator)


class Guided:
    """Classifier-free guidance of `model` against the negative branch `uncond`, row for row with the conditioning it
    is called with: one batched call on [uncond; cond]."""

    def __init__(self, model: ModelFn, uncond, guidance_scale: float):
        self.model, self.uncond, self.guidance_scale = model, uncond, guidance_scale

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        out_uncond, out_cond = self.model(torch.cat([x, x]), torch.cat([t, t]), type(cond).cat([self.uncond, cond])).chunk(2)
        return out_uncond + self.guidance_scale * (out_cond - out_uncond)

    def rows(self, index: torch.Tensor) -> "Guided":
        """The same guidance for the rows `index` of the batch it was built for (their own negative branch)."""
        return Guided(self.model, self.uncond.select(index), self.guidance_scale)


def guided(model: ModelFn, uncond, guidance_scale: float) -> ModelFn:
    """Classifier-free guidance when guidance_scale > 1 (cond types provide `cat` and `select`), else `model` itself."""
    if guidance_scale <= 1.0 or uncond is None:
        return model
    return Guided(model, uncond, guidance_scale)


def on_rows(model: ModelFn, index: torch.Tensor) -> ModelFn:
    """`model`, built for a batch, for the rows `index` of it: a guided model's negative branch follows the rows."""
    return model.rows(index) if isinstance(model, Guided) else model


@torch.no_grad()
def sample(model: ModelFn, sampler: Sampler, noise: torch.Tensor, cond, clean: bool = False) -> torch.Tensor:
    """Sampling over the whole grid from pure noise (scaled by init_noise_sigma = 1 for DDIM and flow matching): the
    latent a pipeline decodes or, with `clean`, the last step's x0 prediction. They differ where the last step does not
    reach alpha-bar 1: SDXL's config (set_alpha_to_one false) ends at 0.99915, noise of std 0.029 that a latent
    meant as a clean x0 to re-noise must not carry; flow matching ends at sigma 0, where the two are the same."""
    x, x0 = noise, noise
    for k in range(len(sampler.grid)):
        index = torch.full((x.shape[0],), k, dtype=torch.long)
        x, x0 = sampler.step(model(x, sampler.grid[index], cond), index, x)
    return x0 if clean else x


def dynamic_shift_mu(image_seq_len: int, scheduler_config: dict) -> float:
    """mu of the resolution-dependent shift (diffusers' calculate_shift): linear in the transformer's image sequence
    length between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift). The pipelines read these from
    the scheduler they built, whose config holds the constructor's defaults (max_shift 1.15) for every key the file
    leaves out, so their own fallbacks (StableDiffusion3Pipeline's 1.16) never apply; read the same way here."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config).config
    base_len, max_len = config.base_image_seq_len, config.max_image_seq_len
    base_shift, max_shift = config.base_shift, config.max_shift
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


class FlowMatchEuler:
    """The flow-matching sampler of SD3/SD3.5 and FLUX.1: x_t = (1 - σ) x0 + σ ε, the model predicts the velocity
    v = ε - x0, and a step is the Euler ODE update x_next = x_t + (σ_next - σ) v with preview x0_hat = x_t - σ v.

    diffusers' `FlowMatchEulerDiscreteScheduler.step` keeps ONE step index for the whole batch, so, as for DDIM, we
    keep the scheduler for its grid and step per sample. The grid is read from the scheduler after `set_timesteps`
    (SD3's static shift, or FLUX's resolution-dependent shift through `mu`), never recomputed here: `grid` holds its
    timesteps σ·1000 (what SD3's transformer takes; a FLUX family divides by 1000), `sigmas` its K + 1 sigmas ending
    at 0, so the step after the last grid point lands on the clean image.
    """

    def __init__(self, scheduler_config: dict, num_inference_steps: int, mu: float | None = None, sigmas: list[float] | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        # The training-time sigmas (before set_timesteps replaces them): what the ordinary flow-matching loss samples.
        self.train_sigmas = self.scheduler.sigmas.clone().double()
        # `sigmas`: a pipeline's own spacing before the shift (FluxPipeline passes linspace(1, 1/N, N)).
        self.scheduler.set_timesteps(num_inference_steps, sigmas=sigmas, mu=mu)
        self.grid: torch.Tensor = self.scheduler.timesteps.clone().float()  # descending σ·1000
        self.sigmas = self.scheduler.sigmas.clone().double()  # (K + 1,), the last one 0

    def sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        """σ per sample (float64) of model timesteps σ·1000."""
        return timesteps.double().cpu() / self.num_train_timesteps

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """((1 - σ) / σ)^2."""
        s = self.sigma(timesteps)
        return ((1 - s) / s) ** 2

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        s = _per_sample(self.sigma(timesteps), x0)
        return (1 - s) * x0 + s * noise

    def step(self, model_output: torch.Tensor, index: torch.Tensor, sample: torch.Tensor):
        """One Euler step from per-sample grid `index` to index + 1. Returns (x_next, x0_hat)."""
        index = index.long().cpu()
        # In float32 as FlowMatchEulerDiscreteScheduler.step computes it: in bf16 the step size σ_next - σ of a
        # 28-step SD3.5 grid is off by up to 18 %.
        x, velocity = sample.float(), model_output.float()
        s, s_next = _per_sample(self.sigmas[index], x), _per_sample(self.sigmas[index + 1], x)
        x0 = x - s * velocity
        return (x + (s_next - s) * velocity).to(sample.dtype), x0.to(sample.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity ε - x0 (the same at every timestep)."""
        return noise - x0

    def exact_noise(self, x0: torch.Tensor, states: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(x_t - (1 - σ) x0) / σ."""
        s = _per_sample(self.sigma(timesteps), states)
        return (states - (1 - s) * x0) / s

    def set_train_density(self, weighting_scheme: str, logit_mean: float = 0.0, logit_std: float = 1.0) -> None:
        """How draw_train_timesteps picks training sigmas, as diffusers' SD3/FLUX training scripts do: "none" =
        uniform over the scheduler's training sigmas; "logit_normal" = u = sigmoid(N(logit_mean, logit_std)), index
        floor(u · N) into them (SD3's density, Esser et al. 2024)."""
        if weighting_scheme not in ("none", "logit_normal"):
            raise ValueError(f"weighting_scheme must be 'none' or 'logit_normal', not {weighting_scheme!r}")
        self.train_density = (weighting_scheme, logit_mean, logit_std)

    def draw_train_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Training sigmas (see set_train_density; uniform by default), as σ·1000."""
        scheme, mean, std = getattr(self, "train_density", ("none", 0.0, 1.0))
        if scheme == "none":
            index = torch.randint(0, len(self.train_sigmas), (count,), generator=generator)
        else:
            u = torch.sigmoid(mean + std * torch.randn(count, generator=generator))
            index = (u * len(self.train_sigmas)).long().clamp(max=len(self.train_sigmas) - 1)
        return (self.train_sigmas[index] * self.num_train_timesteps).float()
