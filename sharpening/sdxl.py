"""The SDXL model family: loading its parts, its conditioning, the UNet call, moving between pixels, latents and
PIL images, and saving what was trained in diffusers' layout.

The training loop reaches a model family only through the names below (the family seam): `load` (parts with
tokenizers, text_encoders, vae, denoiser, scheduler_config), `Conditioning` (sharpening.batched.Batched rows),
`encode_prompts`, `unconditional` (caption dropout), `cfg_negative` (guidance's negative branch, or None),
`time_ids`, `forward` (f(x, t, cond) of the denoiser), `make_sampler`, `denoiser_class`, `latent_channels`,
`encode_images`, `decode`, `vae_dtype`, `save_images`, `DENOISER`, `PIPELINE_CLASS`, `LORA_TARGET_MODULES`,
`save_lora`, `lora_state` and `save_pipeline`. sharpening/sd3.py and sharpening/flux.py are the flow-matching
families with the same names; sharpening/families.py picks the family from a checkpoint's model_index.json.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .batched import Batched
from .sampler import DDIM


@dataclass
class Conditioning(Batched):
    """SDXL conditioning for a batch: per-token embeddings, pooled embedding, add_time_ids."""

    prompt_embeds: torch.Tensor  # (N, 77, 2048)
    pooled: torch.Tensor  # (N, 1280)
    time_ids: torch.Tensor  # (N, 6)


def forward(unet) -> Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]:
    """Adapt an SDXL UNet to f(x, t, cond) -> model output."""

    def call(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return unet(
            x,
            t.to(x.device),
            encoder_hidden_states=cond.prompt_embeds,
            added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids},
            return_dict=False,
        )[0]

    return call


def make_sampler(parts: "SDXLParts", num_inference_steps: int, resolution: int | None = None) -> DDIM:
    """The batched DDIM sampler on the checkpoint's noise schedule (the same at every resolution)."""
    return DDIM(parts.scheduler_config, num_inference_steps)


def denoiser_class():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel


def latent_channels(parts: "SDXLParts") -> int:
    return int(parts.unet.config.in_channels)


@dataclass
class SDXLParts:
    tokenizers: tuple
    text_encoders: tuple
    vae: "AutoencoderKL"  # noqa: F821
    unet: "UNet2DConditionModel"  # noqa: F821
    scheduler_config: dict
    # StableDiffusionXLPipeline encodes the negative prompt as zeros when this is set (SDXL base sets it).
    force_zeros_for_empty_prompt: bool

    @property
    def denoiser(self):
        return self.unet

    @denoiser.setter
    def denoiser(self, value):
        self.unet = value


def model_index(pretrained: str, revision: str | None = None) -> dict:
    """model_index.json of a local folder or hub id; {} when the folder or repository has none. Any other failure to
    read it (no network, no access, a bad id) is raised: guessing the family then would turn an SD3 or FLUX
    checkpoint into an SDXL one and fail later with a message about a missing unet/."""
    path = Path(pretrained) / "model_index.json"
    if path.is_file():
        return json.loads(path.read_text())
    if Path(pretrained).is_dir():
        return {}
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(pretrained, "model_index.json", revision=revision)).read_text())
    except Exception as err:
        # The repository has no index: EntryNotFoundError, except its subclass LocalEntryNotFoundError (offline, or
        # the hub unreachable, and the file not cached), which is a failure to read like any other.
        if isinstance(err, EntryNotFoundError) and not isinstance(err, LocalEntryNotFoundError):
            return {}
        raise ValueError(f"Could not read model_index.json of {pretrained!r} (which says the model family): there is no "
                         f"such local folder, and as a Hugging Face Hub id: {type(err).__name__}: {err}") from err


def load(pretrained: str, vae_path: str | None = None, revision: str | None = None, variant: str | None = None) -> SDXLParts:
    """Load tokenizers, text encoders, VAE and UNet of an SDXL checkpoint (hub id or local folder)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.schedulers import DDIMScheduler
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    def sub(name):
        return dict(pretrained_model_name_or_path=pretrained, subfolder=name, revision=revision)

    tokenizers = (AutoTokenizer.from_pretrained(**sub("tokenizer")), AutoTokenizer.from_pretrained(**sub("tokenizer_2")))
    for tok in tokenizers:
        if len(tok) < 1000:
            # transformers silently returns an almost empty tokenizer when the hub is unreachable.
            raise RuntimeError(f"The tokenizer of {pretrained!r} has only {len(tok)} tokens: was it downloaded completely?")
    text_encoders = (
        CLIPTextModel.from_pretrained(**sub("text_encoder"), variant=variant),
        CLIPTextModelWithProjection.from_pretrained(**sub("text_encoder_2"), variant=variant),
    )
    if vae_path:
        vae = AutoencoderKL.from_pretrained(vae_path, revision=revision)
    else:
        vae = AutoencoderKL.from_pretrained(**sub("vae"), variant=variant)
    if vae.config.get("latents_mean") is not None or vae.config.get("latents_std") is not None:
        # StableDiffusionXLPipeline then decodes latents * std / scaling_factor + mean (Playground v2.5): our previews,
        # rewards and targets use the scaling factor alone and would disagree with the pipeline's images.
        raise ValueError(f"{vae_path or pretrained}: its VAE normalises latents with latents_mean / latents_std, which these "
                         "trainers do not apply; use a checkpoint whose VAE has only a scaling_factor (SDXL base, the fp16-fix VAE).")
    unet = UNet2DConditionModel.from_pretrained(**sub("unet"), variant=variant)
    scheduler_config = dict(DDIMScheduler.load_config(pretrained, subfolder="scheduler", revision=revision))
    index = model_index(pretrained, revision)
    return SDXLParts(tokenizers, text_encoders, vae, unet, scheduler_config, bool(index.get("force_zeros_for_empty_prompt", True)))


def encode_token_ids(text_encoders, token_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL text conditioning of tokenized prompts (one id tensor per encoder): penultimate hidden states of
    both encoders, concatenated; pooled from encoder 2. Runs with grad if the caller allows it."""
    embeds, pooled = [], None
    for encoder, ids in zip(text_encoders, token_ids):
        out = encoder(ids, output_hidden_states=True)
        embeds.append(out.hidden_states[-2])
        pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (the last encoder)
    return torch.cat(embeds, dim=-1), pooled


@torch.no_grad()
def encode_prompts(parts: SDXLParts, prompts: list[str], time_ids: torch.Tensor, device) -> Conditioning:
    """SDXL text conditioning (`encode_token_ids`) of prompts. Prompts longer than the 77-token context are
    truncated, as StableDiffusionXLPipeline does."""
    token_ids = [
        tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)
        for tokenizer in parts.tokenizers
    ]
    embeds, pooled = encode_token_ids(parts.text_encoders, token_ids)
    return Conditioning(embeds, pooled, time_ids.to(device=device, dtype=embeds.dtype))


def unconditional(parts: SDXLParts, cond: Conditioning, device) -> Conditioning:
    """The classifier-free-guidance branch: zeros when the checkpoint says so (SDXL base), else encoded ""."""
    if parts.force_zeros_for_empty_prompt:
        return Conditioning(torch.zeros_like(cond.prompt_embeds), torch.zeros_like(cond.pooled), cond.time_ids)
    return encode_prompts(parts, [""] * cond.pooled.shape[0], cond.time_ids, device)


def cfg_negative(parts: SDXLParts, cond: Conditioning, device) -> Conditioning:
    """Classifier-free guidance's negative branch (FLUX.1-dev, guidance-distilled, has none)."""
    return unconditional(parts, cond, device)


def time_ids(original_sizes, crops_top_left, target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample."""
    rows = [list(o) + list(c) + list(target_size) for o, c in zip(original_sizes, crops_top_left)]
    return torch.tensor(rows, dtype=torch.float32)


def latent_scale(vae) -> float:
    return float(vae.config.scaling_factor)


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents (sampled from the VAE posterior with `generator`)."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(dist.mean.device, dist.mean.dtype)
    return (dist.mean + dist.std * noise) * latent_scale(vae)


def vae_dtype(vae, weight_dtype: torch.dtype) -> torch.dtype:
    """The stock SDXL VAE overflows in fp16 (its config says force_upcast): fp32 for it; a VAE without the flag
    (madebyollin/sdxl-vae-fp16-fix) runs in the weights' dtype. Training and evaluation use this one rule."""
    return torch.float32 if vae.config.get("force_upcast", True) else weight_dtype


def default_decode_chunk(resolution: int) -> int:
    """Images per VAE decode: 8 at 512 px and fewer as the pixel count grows (2 at 1024 px), so decoding the B·n·m
    previews of a step keeps the decoder's activations (which grow with the pixel count) near their 512 px size."""
    return max(1, int(8 * (512 / resolution) ** 2))


def decode(vae, latents: torch.Tensor, chunk_size: int | None = None) -> tuple[list[Image.Image], torch.Tensor]:
    """Scaled SDXL latents -> (PIL images, per-image bool "decoded to finite pixels"); see decode_pixels."""
    return decode_pixels(vae, latents / latent_scale(vae), chunk_size)


@torch.no_grad()
def decode_pixels(vae, latents: torch.Tensor, chunk_size: int | None = None) -> tuple[list[Image.Image], torch.Tensor]:
    """VAE latents (already unscaled) -> (PIL images, per-image bool "decoded to finite pixels"), in chunks so memory
    stays bounded (default: `default_decode_chunk` of the decoded resolution). A NaN/inf decode (e.g. the stock SDXL
    VAE overflowing in fp16) still yields an image, but its flag is False so callers can score it NaN instead of
    scoring a made-up black picture."""
    if chunk_size is None:
        chunk_size = default_decode_chunk(latents.shape[-1] * 2 ** (len(vae.config.block_out_channels) - 1))
    images: list[Image.Image] = []
    finite = []
    for chunk in latents.split(max(1, chunk_size)):
        pixels = vae.decode(chunk.to(vae.device, vae.dtype)).sample.float()
        finite.append(torch.isfinite(pixels).flatten(1).all(1).cpu() & torch.isfinite(chunk).flatten(1).all(1).cpu())
        arrays = ((pixels.nan_to_num(0.0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        images.extend(Image.fromarray(np.ascontiguousarray(a)) for a in arrays)
    return images, torch.cat(finite) if finite else torch.zeros(0, dtype=torch.bool)


def save_images(images: list[Image.Image], folder: str | os.PathLike, prefix: str) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    digits = max(2, len(str(len(images) - 1)))  # zero-padded to the count, so sorted names keep generation order
    for i, image in enumerate(images):
        paths.append(folder / f"{prefix}_{i:0{digits}d}.png")
        image.save(paths[-1])
    return paths


# --------------------------------------------------------------------------------------------- saving
# LoRA on the attention projections of the UNet, as diffusers' train_text_to_image_lora_sdxl.py does.
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
DENOISER = "unet"  # the denoiser's subfolder in the pipeline layout
LATENT_PACKING = 1  # latent pixels per side the pipeline packs into one token outside the denoiser (FLUX: 2)
PIPELINE_CLASS = "StableDiffusionXLPipeline"  # what a full fine-tune is saved as (named in the model card)
SAMPLER = "DDIM (eta 0)"  # how evaluate.py names the sampling in its reports


def save_lora(unet, out: Path) -> None:
    """The UNet's adapters as `pytorch_lora_weights.safetensors`, loadable with `pipe.load_lora_weights(out)`."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionXLPipeline.save_lora_weights(
        save_directory=str(out), unet_lora_layers=layers, safe_serialization=True,
        # rank and alpha travel with the weights, so load_lora_weights applies the trained scale
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )


def lora_state(folder: Path) -> dict[str, torch.Tensor]:
    """The adapters saved in `folder` under peft's parameter names (the inverse of save_lora)."""
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


def save_pipeline(parts: SDXLParts, unet, pretrained: str, out: Path, revision: str | None = None, variant: str | None = None,
                  vae_path: str | None = None) -> None:
    """A complete StableDiffusionXLPipeline with the trained UNet in `out` (diffusers' train_text_to_image_sdxl.py
    contract); the scheduler with the prediction type the UNet was trained for (--prediction_type). The rest is the
    base's, or the VAE of --pretrained_vae_model_name_or_path, all in the UNet's dtype (see export_pipeline)."""
    from diffusers import StableDiffusionXLPipeline

    pipeline = export_pipeline(StableDiffusionXLPipeline, "unet", unet, pretrained, revision, variant, vae_path)
    trained_type = parts.scheduler_config.get("prediction_type", "epsilon")  # diffusers' default when unset
    if pipeline.scheduler.config.prediction_type != trained_type:
        pipeline.scheduler = pipeline.scheduler.from_config(pipeline.scheduler.config, prediction_type=trained_type)
    pipeline.save_pretrained(out, safe_serialization=True)


def export_pipeline(pipeline_class, denoiser_name: str, denoiser, pretrained: str, revision: str | None, variant: str | None,
                    vae_path: str | None):
    """The base pipeline with the trained denoiser, every part in the denoiser's dtype. The frozen parts are loaded
    again, not taken from training: there they were cast to the --mixed_precision dtype, and saved so they would be
    rounded for good and load beside an fp32 denoiser (transformers loads the saved dtype: the first call then fails
    with a dtype mismatch)."""
    from diffusers import AutoencoderKL

    parts = {denoiser_name: denoiser}
    if vae_path:
        parts["vae"] = AutoencoderKL.from_pretrained(vae_path, revision=revision)
    pipeline = pipeline_class.from_pretrained(pretrained, revision=revision, variant=variant, **parts)
    return pipeline.to(denoiser.dtype)
