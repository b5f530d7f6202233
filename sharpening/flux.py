"""The FLUX.1 model family (flow matching, MMDiT with single-stream blocks): the same names as sharpening/sdxl.py.

As FluxPipeline: the pooled embedding is CLIP's pooler output, the token embeddings are T5's; FLUX.1-dev is
guidance-distilled, so `--guidance_scale` is the EMBEDDED guidance the transformer takes (FluxPipeline's
`guidance_scale`), carried per row in the conditioning; true classifier-free guidance against the empty prompt is
off unless `--true_cfg_scale` > 1 (FluxPipeline's true_cfg_scale with negative_prompt ""). The grid is FluxPipeline's:
sigmas linspace(1, 1/N, N), shifted by mu from the packed image sequence length (`dynamic_shift_mu`).

Latents stay (N, C, H, W) everywhere in the trainer (exploration, targets, decoding); `forward` packs them into
FLUX's 2x2 patches (N, H/2 * W/2, 4C) with their position ids around the transformer call and unpacks its output,
so the velocity target and the MSE are the same numbers in either layout. Latents are (z - shift_factor) *
scaling_factor, as SD3's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .batched import Batched
from .sampler import FlowMatchEuler, dynamic_shift_mu
from .sd3 import decode, encode_images, lora_state  # noqa: F401  (SD3's latent convention and LoRA file layout)
from .sdxl import export_pipeline, save_images, vae_dtype  # noqa: F401  (this family's names too: the same VAE rules)

DENOISER = "transformer"
LATENT_PACKING = 2  # FluxPipeline packs 2x2 latent patches before the transformer (whose patch_size is 1)
PIPELINE_CLASS = "FluxPipeline"
SAMPLER = "flow-matching Euler"  # how evaluate.py names the sampling in its reports
# diffusers' train_dreambooth_lora_flux.py targets: joint attention and the feed-forward projections.
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out",
                       "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # T5 tokens, as FluxPipeline and diffusers' FLUX training scripts default


@dataclass
class FluxParts:
    tokenizers: tuple  # CLIP, T5
    text_encoders: tuple
    vae: "AutoencoderKL"  # noqa: F821
    denoiser: "FluxTransformer2DModel"  # noqa: F821
    scheduler_config: dict
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    guidance: float | None = 3.5  # None: a transformer without a guidance embedding (FLUX.1-schnell)


@dataclass
class Conditioning(Batched):
    prompt_embeds: torch.Tensor  # (N, T5 tokens, T5 width)
    pooled: torch.Tensor  # (N, CLIP width)
    guidance: torch.Tensor  # (N,) embedded guidance


def load(pretrained: str, vae_path: str | None = None, revision: str | None = None, variant: str | None = None) -> FluxParts:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    def sub(name):
        return dict(pretrained_model_name_or_path=pretrained, subfolder=name, revision=revision)

    tokenizers = (AutoTokenizer.from_pretrained(**sub("tokenizer")), AutoTokenizer.from_pretrained(**sub("tokenizer_2")))
    text_encoders = (CLIPTextModel.from_pretrained(**sub("text_encoder"), variant=variant),
                     T5EncoderModel.from_pretrained(**sub("text_encoder_2"), variant=variant))
    vae = AutoencoderKL.from_pretrained(vae_path, revision=revision) if vae_path else AutoencoderKL.from_pretrained(**sub("vae"), variant=variant)
    denoiser = FluxTransformer2DModel.from_pretrained(**sub(DENOISER), variant=variant)
    scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(pretrained, subfolder="scheduler", revision=revision))
    return FluxParts(tokenizers, text_encoders, vae, denoiser, scheduler_config,
                     guidance=3.5 if denoiser.config.guidance_embeds else None)


@torch.no_grad()
def encode_prompts(parts: FluxParts, prompts: list[str], time_ids, device) -> Conditioning:
    """FluxPipeline.encode_prompt: CLIP's pooled output and T5's tokens (`parts.max_sequence_length`)."""
    clip_tokenizer, t5_tokenizer = parts.tokenizers
    ids = clip_tokenizer(prompts, padding="max_length", max_length=clip_tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    pooled = parts.text_encoders[0](ids.to(device), output_hidden_states=False).pooler_output
    ids = t5_tokenizer(prompts, padding="max_length", max_length=parts.max_sequence_length, truncation=True, return_tensors="pt").input_ids
    embeds = parts.text_encoders[1](ids.to(device), output_hidden_states=False)[0]
    return Conditioning(embeds, pooled.to(embeds.dtype), torch.full((len(prompts),), math.nan if parts.guidance is None else float(parts.guidance), device=device))


def unconditional(parts: FluxParts, cond: Conditioning, device) -> Conditioning:
    """The empty prompt, encoded (caption dropout's replacement)."""
    return encode_prompts(parts, [""] * len(cond), None, device)


def cfg_negative(parts: FluxParts, cond: Conditioning, device) -> Conditioning:
    """The negative branch of TRUE classifier-free guidance (FluxPipeline's true_cfg_scale with negative_prompt ""):
    the empty prompt with the same embedded guidance. FLUX.1-dev is guidance-distilled, so it is used only when
    --true_cfg_scale (or --explore_guidance_scale) is above 1; by default sampling is one pass per step."""
    return unconditional(parts, cond, device)


def time_ids(original_sizes, crops_top_left, target_size):
    """FLUX has no size micro-conditioning."""
    return None


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/2 * W/2, 4C), FluxPipeline._pack_latents' layout."""
    n, c, h, w = latents.shape
    return latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """pack's inverse, for latents of height x width."""
    n, _, channels = tokens.shape
    return tokens.view(n, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, channels // 4, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(H/2 * W/2, 3) position ids of the packed latent patches (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def forward(transformer) -> Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]:
    """Adapt a FLUX transformer (bare or DDP-wrapped) to f(x, t, cond) -> velocity on unpacked latents; it takes σ
    (our grid's σ·1000 / 1000)."""
    embeds_guidance = getattr(transformer, "module", transformer).config.guidance_embeds

    def call(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        height, width = x.shape[-2:]
        guidance = cond.guidance.to(x.device, torch.float32) if embeds_guidance else None
        out = transformer(
            hidden_states=pack(x), timestep=t.to(x.device, x.dtype) / 1000, guidance=guidance,
            pooled_projections=cond.pooled, encoder_hidden_states=cond.prompt_embeds,
            txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=image_ids(height, width, x.device, x.dtype), return_dict=False,
        )[0]
        return unpack(out, height, width)

    return call


def make_sampler(parts: FluxParts, num_inference_steps: int, resolution: int) -> FlowMatchEuler:
    """FluxPipeline's grid at this resolution: sigmas linspace(1, 1/N, N), shifted by mu of the packed sequence length."""
    latent_side = resolution // 2 ** (len(parts.vae.config.block_out_channels) - 1)
    mu = dynamic_shift_mu((latent_side // 2) ** 2, parts.scheduler_config)
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).tolist()
    return FlowMatchEuler(parts.scheduler_config, num_inference_steps, mu=mu, sigmas=sigmas)


def denoiser_class():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel


def latent_channels(parts: FluxParts) -> int:
    return int(parts.vae.config.latent_channels)


# --------------------------------------------------------------------------------------------- saving
def save_lora(transformer, out: Path) -> None:
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    FluxPipeline.save_lora_weights(
        save_directory=str(out), transformer_lora_layers=get_peft_model_state_dict(transformer), safe_serialization=True,
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )


def save_pipeline(parts: FluxParts, transformer, pretrained: str, out: Path, revision: str | None = None,
                  variant: str | None = None, vae_path: str | None = None) -> None:
    """A complete FluxPipeline with the trained transformer in `out` (the rest as sdxl.export_pipeline loads it)."""
    from diffusers import FluxPipeline

    export_pipeline(FluxPipeline, "transformer", transformer, pretrained, revision, variant, vae_path).save_pretrained(out, safe_serialization=True)
