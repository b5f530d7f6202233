"""The SD3 / SD3.5 model family (flow matching, MMDiT): the same names as sharpening/sdxl.py (the family seam).

Conditioning follows StableDiffusion3Pipeline.encode_prompt: the penultimate hidden states of the two CLIP encoders,
concatenated and zero-padded to T5's width, then T5's tokens after them along the sequence; the pooled embedding is
both CLIP projections concatenated. The empty prompt "" encoded the same way is classifier-free guidance's negative
branch (SD3 does not zero it). Latents are (z - shift_factor) * scaling_factor. The sampler is the per-sample
flow-matching Euler step on the checkpoint's scheduler grid (sharpening.sampler.FlowMatchEuler).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .batched import Batched
from .sampler import FlowMatchEuler, dynamic_shift_mu
from .sdxl import decode_pixels, export_pipeline, save_images, vae_dtype  # noqa: F401  (this family's names too: the same VAE rules)

DENOISER = "transformer"
LATENT_PACKING = 1  # the transformer patchifies itself (its config's patch_size)
PIPELINE_CLASS = "StableDiffusion3Pipeline"
SAMPLER = "flow-matching Euler"  # how evaluate.py names the sampling in its reports
# diffusers' train_dreambooth_lora_sd3.py targets; SD3.5's second attention (attn2) has the same projection names.
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
DEFAULT_MAX_SEQUENCE_LENGTH = 77  # T5 tokens, as diffusers' SD3 training scripts default


@dataclass
class SD3Parts:
    tokenizers: tuple
    text_encoders: tuple  # CLIP-L, CLIP-G (both with projection), T5
    vae: "AutoencoderKL"  # noqa: F821
    denoiser: "SD3Transformer2DModel"  # noqa: F821
    scheduler_config: dict
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH


@dataclass
class Conditioning(Batched):
    prompt_embeds: torch.Tensor  # (N, 77 + T5 tokens, T5 width)
    pooled: torch.Tensor  # (N, CLIP-L + CLIP-G projection widths)


def load(pretrained: str, vae_path: str | None = None, revision: str | None = None, variant: str | None = None) -> SD3Parts:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    def sub(name):
        return dict(pretrained_model_name_or_path=pretrained, subfolder=name, revision=revision)

    tokenizers = tuple(AutoTokenizer.from_pretrained(**sub(name)) for name in ("tokenizer", "tokenizer_2", "tokenizer_3"))
    text_encoders = (
        CLIPTextModelWithProjection.from_pretrained(**sub("text_encoder"), variant=variant),
        CLIPTextModelWithProjection.from_pretrained(**sub("text_encoder_2"), variant=variant),
        T5EncoderModel.from_pretrained(**sub("text_encoder_3"), variant=variant),
    )
    vae = AutoencoderKL.from_pretrained(vae_path, revision=revision) if vae_path else AutoencoderKL.from_pretrained(**sub("vae"), variant=variant)
    denoiser = SD3Transformer2DModel.from_pretrained(**sub(DENOISER), variant=variant)
    scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(pretrained, subfolder="scheduler", revision=revision))
    return SD3Parts(tokenizers, text_encoders, vae, denoiser, scheduler_config)


def tokenize(tokenizers, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids for CLIP-L, CLIP-G (truncated to 77) and T5 (truncated to `max_sequence_length`), as
    StableDiffusion3Pipeline tokenizes."""
    clip = [tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
            for tokenizer in tokenizers[:2]]
    t5 = tokenizers[2](prompts, padding="max_length", max_length=max_sequence_length, truncation=True, add_special_tokens=True,
                       return_tensors="pt").input_ids
    return clip[0], clip[1], t5


def encode_token_ids(text_encoders, token_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 text conditioning of tokenized prompts (`tokenize`): the penultimate hidden states of the two CLIP
    encoders concatenated and zero-padded to T5's width, then T5's tokens after them along the sequence; pooled =
    both CLIP projections. Runs with grad if the caller allows it (toyworld.train_base trains the encoders)."""
    clip_embeds, pooled = [], []
    for encoder, ids in zip(text_encoders[:2], token_ids[:2]):
        out = encoder(ids, output_hidden_states=True)
        clip_embeds.append(out.hidden_states[-2])
        pooled.append(out[0])
    t5 = text_encoders[2](token_ids[2])[0]
    clip = torch.cat(clip_embeds, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1])).to(t5.dtype)
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


@torch.no_grad()
def encode_prompts(parts: SD3Parts, prompts: list[str], time_ids, device) -> Conditioning:
    """SD3's text conditioning of prompts (`time_ids` is SDXL's and ignored)."""
    ids = tokenize(parts.tokenizers, prompts, parts.max_sequence_length)
    return Conditioning(*encode_token_ids(parts.text_encoders, [i.to(device) for i in ids]))


def unconditional(parts: SD3Parts, cond: Conditioning, device) -> Conditioning:
    """Classifier-free guidance's negative branch: the empty prompt, encoded."""
    return encode_prompts(parts, [""] * len(cond), None, device)


cfg_negative = unconditional


def time_ids(original_sizes, crops_top_left, target_size):
    """SD3 has no size micro-conditioning."""
    return None


def forward(transformer) -> Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]:
    """Adapt an SD3 transformer to f(x, t, cond) -> velocity; it takes the timestep as σ·1000, our grid's unit."""

    def call(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return transformer(hidden_states=x, timestep=t.to(x.device), encoder_hidden_states=cond.prompt_embeds,
                           pooled_projections=cond.pooled, return_dict=False)[0]

    return call


def make_sampler(parts: SD3Parts, num_inference_steps: int, resolution: int | None = None) -> FlowMatchEuler:
    """The flow-matching sampler on the checkpoint's grid. SD3/SD3.5's own schedulers shift statically (the same grid at
    every resolution); a checkpoint whose scheduler sets use_dynamic_shifting gets the resolution's mu from the image
    sequence length, as StableDiffusion3Pipeline computes it (which is why it needs `resolution`)."""
    if not parts.scheduler_config.get("use_dynamic_shifting"):
        return FlowMatchEuler(parts.scheduler_config, num_inference_steps)
    if resolution is None:
        raise ValueError("this SD3 checkpoint's scheduler shifts its grid by resolution (use_dynamic_shifting): give the resolution.")
    latent_side = resolution // 2 ** (len(parts.vae.config.block_out_channels) - 1)
    patch = int(parts.denoiser.config.patch_size)
    mu = dynamic_shift_mu((latent_side // patch) ** 2, parts.scheduler_config)
    return FlowMatchEuler(parts.scheduler_config, num_inference_steps, mu=mu)


def denoiser_class():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel


def latent_channels(parts: SD3Parts) -> int:
    return int(parts.denoiser.config.in_channels)


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels in [-1, 1] -> (z - shift_factor) * scaling_factor, z sampled from the VAE posterior with `generator`."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(dist.mean.device, dist.mean.dtype)
    return (dist.mean + dist.std * noise - vae.config.shift_factor) * vae.config.scaling_factor


def decode(vae, latents: torch.Tensor, chunk_size: int | None = None):
    """(PIL images, finite flags) of SD3 latents (see sdxl.decode_pixels for chunking and the finite flag)."""
    return decode_pixels(vae, latents / vae.config.scaling_factor + vae.config.shift_factor, chunk_size)


# --------------------------------------------------------------------------------------------- saving
def save_lora(transformer, out: Path) -> None:
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    StableDiffusion3Pipeline.save_lora_weights(
        save_directory=str(out), transformer_lora_layers=get_peft_model_state_dict(transformer), safe_serialization=True,
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )


def lora_state(folder: Path) -> dict[str, torch.Tensor]:
    from diffusers import StableDiffusion3Pipeline

    if not (folder / "pytorch_lora_weights.safetensors").is_file():
        raise ValueError(f"Checkpoint {folder} holds no pytorch_lora_weights.safetensors: was it made by a full fine-tune (then drop --use_lora)?")
    lora = StableDiffusion3Pipeline.lora_state_dict(str(folder))
    lora = lora[0] if isinstance(lora, tuple) else lora
    state = {k.removeprefix("transformer."): v for k, v in lora.items() if k.startswith("transformer.")}
    return {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
            for k, v in state.items()}


def save_pipeline(parts: SD3Parts, transformer, pretrained: str, out: Path, revision: str | None = None,
                  variant: str | None = None, vae_path: str | None = None) -> None:
    """A complete StableDiffusion3Pipeline with the trained transformer in `out` (the rest as sdxl.export_pipeline loads it)."""
    from diffusers import StableDiffusion3Pipeline

    export_pipeline(StableDiffusion3Pipeline, "transformer", transformer, pretrained, revision, variant, vae_path).save_pretrained(out, safe_serialization=True)

