"""Which model family a checkpoint belongs to, from the pipeline class its model_index.json names."""
from __future__ import annotations

import importlib
import logging
from types import ModuleType

from .sdxl import model_index

logger = logging.getLogger("sharpening")

FAMILIES = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def family_of(pretrained: str) -> ModuleType:
    """The family module (sharpening.sdxl, sd3 or flux) for a checkpoint folder or hub id."""
    name = model_index(pretrained).get("_class_name")
    if name is None:
        logger.warning("Could not read %s/model_index.json; assuming an SDXL checkpoint.", pretrained)
        return importlib.import_module("sharpening.sdxl")
    if name not in FAMILIES:
        raise ValueError(f"{pretrained} is a {name} checkpoint; supported: {', '.join(sorted(FAMILIES))}.")
    return importlib.import_module(f"sharpening.{FAMILIES[name]}")


def apply_text_settings(parts, args) -> None:
    """The flags that shape a family's conditioning: T5 tokens (SD3, FLUX) and FLUX.1-dev's embedded guidance
    (`--guidance_scale`). Families without them (SDXL) have no such fields and are left as they are."""
    if hasattr(parts, "max_sequence_length"):
        parts.max_sequence_length = args.max_sequence_length
    if hasattr(parts, "guidance"):
        parts.guidance = args.guidance_scale
    elif args.true_cfg_scale != 1.0:
        raise ValueError("--true_cfg_scale is FLUX.1's true classifier-free guidance; SDXL and SD3 take their CFG scale from --guidance_scale.")


def cfg_scale(parts, args) -> float:
    """The classifier-free guidance scale of rollouts and evaluation samples: --guidance_scale, except for FLUX.1,
    whose --guidance_scale is the embedded guidance and whose true CFG (against "") is --true_cfg_scale (1 = off)."""
    return args.true_cfg_scale if hasattr(parts, "guidance") else args.guidance_scale


def with_guidance(family: ModuleType, parts, model, cond, scale: float, device):
    """`model` under classifier-free guidance at `scale` against the family's negative branch, which is encoded
    only when it is used (scale > 1)."""
    from .sampler import guided

    negative = family.cfg_negative(parts, cond, device) if scale > 1.0 else None
    return guided(model, negative.to(dtype=cond.prompt_embeds.dtype) if negative is not None else None, scale)
