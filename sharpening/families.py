"""Which model family a checkpoint belongs to, from the pipeline class its model_index.json names."""
from __future__ import annotations

import importlib
import logging
from types import ModuleType

from .sdxl import model_index

logger = logging.getLogger("sharpening")

FAMILIES = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def family_of(pretrained: str, revision: str | None = None) -> ModuleType:
    """The family module (sharpening.sdxl, sd3 or flux) for a checkpoint folder or hub id."""
    name = model_index(pretrained, revision).get("_class_name")
    if name is None:
        logger.warning("%s has no model_index.json naming its pipeline; assuming an SDXL checkpoint.", pretrained)
        return importlib.import_module("sharpening.sdxl")
    if name not in FAMILIES:
        raise ValueError(f"{pretrained} is a {name} checkpoint; supported: {', '.join(sorted(FAMILIES))}.")
    return importlib.import_module(f"sharpening.{FAMILIES[name]}")


def denoiser_config(family: ModuleType, pretrained: str, revision: str | None = None) -> dict:
    """The denoiser's config.json (SDXL's UNet, SD3's or FLUX's transformer): read before any weight loads."""
    return dict(family.denoiser_class().load_config(pretrained, subfolder=family.DENOISER, revision=revision))


def scheduler_prediction_type(pretrained: str, revision: str | None = None) -> str:
    """What an SDXL checkpoint's scheduler config says it predicts (diffusers' epsilon where it names none)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.load_config(pretrained, subfolder="scheduler", revision=revision).get("prediction_type") or "epsilon"


def resolution_multiple(family: ModuleType, pretrained: str, revision: str | None = None) -> int:
    """Image sides must be a multiple of this: the VAE's downsampling times the latent patch (SD3.5's transformer
    patches 2x2; FLUX packs 2x2 latents outside its transformer). From the configs only, before any weights load."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.load_config(pretrained, subfolder="vae", revision=revision)
    denoiser = denoiser_config(family, pretrained, revision)
    return 2 ** (len(vae["block_out_channels"]) - 1) * int(denoiser.get("patch_size", 1)) * family.LATENT_PACKING


def native_resolution(family: ModuleType, pretrained: str, revision: str | None = None) -> int:
    """The image side a checkpoint was made for, from its configs: the denoiser's sample_size (latent pixels) times the
    VAE's downsampling. FLUX's transformer config has none: FluxPipeline's default, 128 latent pixels (1024 px)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.load_config(pretrained, subfolder="vae", revision=revision)
    denoiser = denoiser_config(family, pretrained, revision)
    return int(denoiser.get("sample_size", 128)) * 2 ** (len(vae["block_out_channels"]) - 1)


def check_resolution(family: ModuleType, pretrained: str, resolution: int, revision: str | None = None) -> None:
    """Refuse, from the configs alone, a side the denoiser cannot take: not a whole number of latent patches, or (SD3)
    more patches than its positional embedding holds, which diffusers' PatchEmbed refuses only at the first forward."""
    multiple = resolution_multiple(family, pretrained, revision)
    if resolution % multiple:
        lower = resolution // multiple * multiple
        raise ValueError(f"--resolution {resolution}: {pretrained} needs a multiple of {multiple} (the VAE's downsampling times "
                         f"the denoiser's latent patch); use {lower or multiple} or {lower + multiple}.")
    max_patches = denoiser_config(family, pretrained, revision).get("pos_embed_max_size")
    if max_patches and resolution // multiple > max_patches:
        raise ValueError(f"--resolution {resolution}: {pretrained}'s positional embedding covers {max_patches} patches a side "
                         f"(pos_embed_max_size), {max_patches * multiple} px; use a resolution up to that.")


def check_true_cfg(is_flux: bool, true_cfg_scale: float, model: str = "") -> None:
    """--true_cfg_scale is FLUX.1's alone: refused for any other model (`model` names it in the message)."""
    if true_cfg_scale != 1.0 and not is_flux:
        raise ValueError("--true_cfg_scale is FLUX.1's true classifier-free guidance" + (f", but {model} is not FLUX.1" if model else "")
                         + "; SDXL and SD3 take their CFG scale from --guidance_scale.")


def check_family_flags(family: ModuleType, args) -> None:
    """Flags only some families take, refused from model_index.json alone, before any weight is loaded (minutes for
    SDXL, more for FLUX.1-dev with its T5)."""
    sdxl = family.PIPELINE_CLASS == "StableDiffusionXLPipeline"
    if args.prediction_type and not sdxl:
        raise ValueError("--prediction_type chooses between epsilon and v prediction (SDXL); flow families (SD3, FLUX) always "
                         "predict the velocity: drop the flag.")
    if args.loss_weighting != "none" and not sdxl:
        raise ValueError("--loss_weighting v is for epsilon-prediction families (SDXL); flow families (SD3, FLUX) already train "
                         "the velocity loss: drop the flag.")
    if args.weighting_scheme != "none" and sdxl:
        raise ValueError("--weighting_scheme is for flow-matching families (SD3, FLUX); SDXL draws training timesteps uniformly: "
                         "drop the flag.")
    if args.max_sequence_length is not None and sdxl:
        raise ValueError("--max_sequence_length sets the T5 tokens of SD3 and FLUX.1; SDXL's CLIP encoders always read 77: drop the flag.")
    if (args.loss_weighting == "v" and sdxl
            and (args.prediction_type or scheduler_prediction_type(args.pretrained_model_name_or_path, args.revision)) == "v_prediction"):
        raise ValueError("--loss_weighting v gives an epsilon-prediction model the v-prediction loss; this model already predicts "
                         "v (--prediction_type or its scheduler config), whose loss is that weighting: drop the flag.")
    is_flux = family.PIPELINE_CLASS == "FluxPipeline"
    if (is_flux and args.guidance_scale is not None
            and not denoiser_config(family, args.pretrained_model_name_or_path, args.revision).get("guidance_embeds", False)):
        raise no_guidance_embedding(args.guidance_scale)
    check_true_cfg(is_flux, args.true_cfg_scale)


def no_guidance_embedding(guidance_scale: float) -> ValueError:
    return ValueError(f"--guidance_scale {guidance_scale:g}: this FLUX.1 transformer has no guidance embedding (FLUX.1-schnell is not "
                      "guidance-distilled), so the flag would do nothing; drop it, or use --true_cfg_scale for classifier-free "
                      "guidance against the empty prompt.")


# Classifier-free guidance scale of SDXL and SD3 when --guidance_scale is not given (our recipes and diffusers' examples).
DEFAULT_CFG_SCALE = 5.0


def apply_text_settings(parts, args) -> None:
    """The flags that shape a family's conditioning: T5 tokens (SD3, FLUX) and FLUX.1-dev's embedded guidance
    (`--guidance_scale`). Families without them (SDXL) have no such fields and are left as they are. A flag left
    out (None) takes the family's default, written back to `args` so that model cards and trackers record what ran:
    T5 tokens 77 for SD3 (diffusers' SD3 training scripts) and 512 for FLUX.1 (FluxPipeline and diffusers' FLUX
    scripts); guidance 3.5 for FLUX.1 (embedded, as FluxPipeline; none for a transformer without the embedding) and CFG 5
    otherwise."""
    if hasattr(parts, "max_sequence_length"):
        if args.max_sequence_length is None:
            args.max_sequence_length = parts.max_sequence_length
        parts.max_sequence_length = args.max_sequence_length
    if hasattr(parts, "guidance") and parts.guidance is None and args.guidance_scale is not None:
        raise no_guidance_embedding(args.guidance_scale)
    if args.guidance_scale is None:
        args.guidance_scale = parts.guidance if hasattr(parts, "guidance") else DEFAULT_CFG_SCALE
    if hasattr(parts, "guidance"):
        parts.guidance = args.guidance_scale
    check_true_cfg(hasattr(parts, "guidance"), args.true_cfg_scale)


def cfg_scale(parts, args) -> float:
    """The classifier-free guidance scale of rollouts and evaluation samples: --guidance_scale, except for FLUX.1,
    whose --guidance_scale is the embedded guidance and whose true CFG (against "") is --true_cfg_scale (1 = off)."""
    return args.true_cfg_scale if hasattr(parts, "guidance") else args.guidance_scale


def with_guidance(family: ModuleType, parts, model, cond, scale: float, device):
    """`model` under classifier-free guidance at `scale` against the family's negative branch, which is encoded
    only when it is used (scale > 1)."""
    from .sampler import guided

    negative = family.cfg_negative(parts, cond, device) if scale > 1.0 else None
    return guided(model, negative.like(cond) if negative is not None else None, scale)
