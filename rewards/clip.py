"""Rewards on CLIP image and text embeddings: clip (open_clip cosine), hpsv2 (Human Preference Score v2/v2.1),
pickscore (PickScore v1) and aesthetic (the LAION aesthetic predictor on CLIP ViT-L/14), with their flags."""
from __future__ import annotations

import argparse
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from .base import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD, ChunkedReward, to_rgb
from .model_files import load_state_dict_file, single_model_file
from .registry import register_reward

logger = logging.getLogger(__name__)


# ================================================================================================= CLIP
def _clip_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--clip_model", default="ViT-L-14",
                   help="open_clip architecture for the clip reward (e.g. ViT-L-14, ViT-L-14-quickgelu, ViT-H-14), "
                        "or 'hf-hub:org/repo' / 'local-dir:/path' with an open_clip config.")
    g.add_argument("--clip_pretrained", default="openai",
                   help="open_clip weights: a pretrained tag of --clip_model (default 'openai', the paper's CLIP) or a "
                        "local checkpoint file. For a local copy of OpenAI weights use --clip_model "
                        "ViT-L-14-quickgelu, since a file does not say which activation it was trained with.")


class ClipReward(ChunkedReward):
    """Cosine similarity of normalised open_clip image and text embeddings (about 0.33 for a good
    SDXL image with ViT-L-14: the paper's reporting scale, not the upstream's x100). HPS v2 is the same score on
    its own fine-tuned weights and image transform."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, device: torch.device,
                 dtype: torch.dtype, batch_size: int, name: str = "clip") -> None:
        super().__init__(device, dtype, batch_size)
        self.name, self.model, self.preprocess, self.tokenizer = name, model, preprocess, tokenizer

    def score_chunk(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        # open_clip's tokenizers truncate to the context length (keeping the end-of-text token), so
        # long JourneyDB/DiffusionDB prompts are scored on their first 77 tokens; the upstream release's CLIP
        # scoring crashes on them.
        tokens = self.tokenizer(list(prompts)).to(self.device)
        image_features = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text_features = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return (image_features * text_features).sum(dim=-1)

    def __repr__(self) -> str:
        return (f"ClipReward(name={self.name!r}, device={str(self.device)!r}, dtype={self.dtype}, "
                f"batch_size={self.batch_size})")


_OPEN_CLIP_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@register_reward("clip", flags=_clip_flags)
def build_clip_reward(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> ClipReward:
    backbone = open_clip_backbone(args.clip_model, args.clip_pretrained, device, dtype, "--clip_model", "--clip_pretrained")
    reward = ClipReward(backbone.model, backbone.preprocess, backbone.tokenizer, device, dtype, args.reward_batch_size)
    reward.backbone = backbone  # keeps the shared backbone alive as long as the reward
    return reward


@dataclass(eq=False)
class OpenClipBackbone:
    """An open_clip model with its preprocessing and tokenizer. Rewards on the same architecture, weights,
    device and dtype (e.g. 'clip,aesthetic' on ViT-L-14 OpenAI) share one copy instead of loading it twice."""

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable


_BACKBONES: "weakref.WeakValueDictionary[tuple, OpenClipBackbone]" = weakref.WeakValueDictionary()


def open_clip_backbone(model_name: str, pretrained: str | None, device: torch.device, dtype: torch.dtype,
                       model_flag: str, pretrained_flag: str) -> OpenClipBackbone:
    """Load (or reuse) an open_clip model with trained weights: a pretrained tag or a local checkpoint file."""
    import open_clip

    key = (model_name, pretrained, str(device), dtype)
    backbone = _BACKBONES.get(key)
    if backbone is not None:
        return backbone
    kwargs: dict[str, Any] = {}
    if not model_name.startswith(("hf-hub:", "local-dir:")):
        model_name = model_name.replace("/", "-")  # OpenAI's spelling "ViT-L/14" -> open_clip's "ViT-L-14"
        tag_cfg = _check_clip_weights(open_clip, model_name, pretrained, model_flag, pretrained_flag)
        # OpenAI's CLIP was trained with QuickGELU; open_clip's plain configs use GELU and only warn on the
        # mismatch, which silently shifts every score. The tag says which one the weights need.
        kwargs = {"pretrained": pretrained, "force_quick_gelu": bool(tag_cfg.get("quick_gelu", False))}
        if not tag_cfg and not model_name.endswith("-quickgelu") and open_clip.get_pretrained_cfg(model_name, "openai").get("quick_gelu"):
            # A checkpoint file does not record its activation, and OpenAI's weights of this architecture need QuickGELU.
            logger.warning("%s %r is a file: building %s with GELU. If these are OpenAI's weights, use %s %s-quickgelu: they "
                           "were trained with QuickGELU, and the wrong activation shifts every score without an error.",
                           pretrained_flag, pretrained, model_name, model_flag, model_name)
    if dtype not in _OPEN_CLIP_PRECISION:
        raise ValueError(f"{model_flag}: unsupported dtype {dtype}; use float32, float16 or bfloat16.")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, device=device, precision=_OPEN_CLIP_PRECISION[dtype], **kwargs)
    except RuntimeError as err:
        if "download" not in str(err).lower():
            raise
        raise RuntimeError(f"{model_flag} {model_name} {pretrained_flag} {pretrained}: cannot download the weights ({err}). "
                           f"Without network, pass a local checkpoint file to {pretrained_flag} (for OpenAI's weights with "
                           f"{model_flag} {model_name.removesuffix('-quickgelu')}-quickgelu).") from None
    model.eval().requires_grad_(False)
    backbone = OpenClipBackbone(model, preprocess, open_clip.get_tokenizer(model_name))
    _BACKBONES[key] = backbone
    return backbone


def _check_clip_weights(open_clip: Any, model_name: str, pretrained: str | None, model_flag: str,
                        pretrained_flag: str) -> dict:
    if model_name not in open_clip.list_models():
        raise ValueError(f"{model_flag} {model_name!r} is not an open_clip architecture; see open_clip.list_models().")
    if not pretrained:
        raise ValueError(f"{pretrained_flag} is empty: a CLIP reward needs trained weights (a tag such as 'openai' "
                         "or a checkpoint file).")
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg and not os.path.isfile(pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise ValueError(f"{pretrained_flag} {pretrained!r} is neither a pretrained tag of {model_name} "
                         f"(tags: {tags}) nor an existing checkpoint file.")
    return tag_cfg


# ======================================================================================== HPS v2 / v2.1
# Human Preference Score v2 (Wu et al., arXiv 2306.09341; github.com/tgxs002/HPSv2): OpenCLIP ViT-H-14
# fine-tuned on human preferences; the score is the cosine of image and prompt embeddings (hpsv2/img_score.py).
HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def _hpsv2_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--hpsv2_checkpoint", default="xswu/HPSv2",
                   help="HPS weights: a .pt file, or a folder / Hugging Face Hub repo id holding the file of "
                        "--hpsv2_version.")
    g.add_argument("--hpsv2_version", default="v2.1", choices=sorted(HPS_CHECKPOINTS),
                   help="Which HPS checkpoint to take from a folder or repo (v2.1 is the one Flow-GRPO and DanceGRPO train on).")
    g.add_argument("--hpsv2_clip_model", default="ViT-H-14", help="open_clip architecture of the HPS checkpoint.")


def hps_preprocess(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """HPS's evaluation transform: the longer side bicubic-resized (on the tensor) to image_size, zero-padded to
    a centred square, CLIP normalisation. Unlike HPS, an image already image_size long is padded too, so that
    non-square images of that size can be batched."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    def transform(image: Image.Image) -> torch.Tensor:
        pixels = TF.to_tensor(to_rgb(image))
        height, width = pixels.shape[1:]
        scale = image_size / max(height, width)
        if scale != 1.0:
            height, width = round(height * scale), round(width * scale)
            pixels = TF.resize(pixels, [height, width], InterpolationMode.BICUBIC)
        pad_h, pad_w = image_size - height, image_size - width
        if pad_h or pad_w:
            pixels = TF.pad(pixels, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        return TF.normalize(pixels, CLIP_PIXEL_MEAN, CLIP_PIXEL_STD)

    return transform


@register_reward("hpsv2", flags=_hpsv2_flags)
def build_hpsv2_reward(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> ClipReward:
    import open_clip

    if args.hpsv2_clip_model not in open_clip.list_models():
        raise ValueError(f"--hpsv2_clip_model {args.hpsv2_clip_model!r} is not an open_clip architecture.")
    checkpoint = single_model_file(args.hpsv2_checkpoint, HPS_CHECKPOINTS[args.hpsv2_version], "--hpsv2_checkpoint")
    state = load_state_dict_file(checkpoint, "--hpsv2_checkpoint")
    model = open_clip.create_model(args.hpsv2_clip_model, pretrained=None)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"--hpsv2_checkpoint {checkpoint} does not fit --hpsv2_clip_model "
                         f"{args.hpsv2_clip_model}: {err}") from None
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ClipReward(model, hps_preprocess(int(size)), open_clip.get_tokenizer(args.hpsv2_clip_model), device, dtype,
                      args.reward_batch_size, name="hpsv2")


# ============================================================================================ PickScore
# PickScore v1 (Kirstain et al., arXiv 2305.01569): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences,
# scored as in its model card: logit_scale.exp() * cosine(image, prompt), about 20-23 for typical images.
def _pickscore_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--pickscore_model", default="yuvalkirstain/PickScore_v1",
                   help="PickScore weights (a transformers CLIPModel): hub id or local folder.")
    g.add_argument("--pickscore_processor", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                   help="Its processor (image transform and tokenizer): hub id or local folder.")


class PickScoreReward(ChunkedReward):
    name = "pickscore"

    def __init__(self, model: Any, processor: Any, device: torch.device, dtype: torch.dtype, batch_size: int) -> None:
        super().__init__(device, dtype, batch_size)
        self.model, self.processor = model, processor

    def score_chunk(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        pixels = self.processor(images=[to_rgb(image) for image in images], return_tensors="pt").pixel_values
        text = self.processor(text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embeds = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        text_embeds = _pooled(self.model.get_text_features(input_ids=text.input_ids.to(self.device),
                                                           attention_mask=text.attention_mask.to(self.device)))
        cosine = (torch.nn.functional.normalize(image_embeds.float(), dim=-1)
                  * torch.nn.functional.normalize(text_embeds.float(), dim=-1)).sum(dim=-1)
        return self.model.logit_scale.float().exp() * cosine


def _pooled(output: Any) -> torch.Tensor:
    """transformers 4 returns the projected embedding; transformers 5 an output whose pooler_output holds it."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _from_pretrained(cls: Any, source: str, flag: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise RuntimeError(f"{flag} {source!r}: cannot load it ({type(err).__name__}: {err}). Without network, "
                           f"download the repo elsewhere (huggingface-cli download {source}) and pass the local "
                           "folder.") from None


@register_reward("pickscore", flags=_pickscore_flags)
def build_pickscore_reward(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> PickScoreReward:
    from transformers import AutoProcessor, CLIPModel

    processor = _from_pretrained(AutoProcessor, args.pickscore_processor, "--pickscore_processor")
    model = _from_pretrained(CLIPModel, args.pickscore_model, "--pickscore_model", dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    return PickScoreReward(model, processor, device, dtype, args.reward_batch_size)


# ============================================================================================ aesthetic
# LAION aesthetic predictor v2 (github.com/christophschuhmann/improved-aesthetic-predictor, simple_inference.py):
# an MLP on the L2-normalised CLIP ViT-L/14 (OpenAI) image embedding, predicting a 1-10 rating. The weights are
# sac+logos+ava1-l14-linearMSE.pth, mirrored as trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth (DDPO).
AESTHETIC_LAYERS = (0, 2, 4, 6, 7)  # Linear layers of the original nn.Sequential (Dropouts in between, no activation)


def _aesthetic_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--aesthetic_model", default="trl-lib/ddpo-aesthetic-predictor",
                   help="Aesthetic MLP weights: the .pth file (e.g. sac+logos+ava1-l14-linearMSE.pth), or a folder / "
                        "hub repo holding aesthetic-model.pth.")
    g.add_argument("--aesthetic_clip_model", default="ViT-L-14",
                   help="open_clip image encoder the MLP was trained on (shared with the clip reward when equal).")
    g.add_argument("--aesthetic_clip_pretrained", default="openai",
                   help="Its weights: an open_clip tag or a file (a local copy of OpenAI's: --aesthetic_clip_model ViT-L-14-quickgelu).")


class AestheticMLP(torch.nn.Module):
    """The predictor's head: Linear layers only (its Dropouts are identity at inference), widths from the weights."""

    def __init__(self, state: dict[str, torch.Tensor], source: str) -> None:
        super().__init__()
        missing = [f"layers.{i}.{p}" for i in AESTHETIC_LAYERS for p in ("weight", "bias") if f"layers.{i}.{p}" not in state]
        if missing:
            raise ValueError(f"--aesthetic_model {source}: not an aesthetic predictor (missing {', '.join(missing)}).")
        self.linears = torch.nn.ModuleList(
            torch.nn.Linear(state[f"layers.{i}.weight"].shape[1], state[f"layers.{i}.weight"].shape[0]) for i in AESTHETIC_LAYERS)
        self.linears.load_state_dict({f"{k}.{p}": state[f"layers.{i}.{p}"] for k, i in enumerate(AESTHETIC_LAYERS) for p in ("weight", "bias")})
        self.in_features = self.linears[0].in_features

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        for linear in self.linears:
            embedding = linear(embedding)
        return embedding.squeeze(-1)


class AestheticReward(ChunkedReward):
    name = "aesthetic"

    def __init__(self, backbone: OpenClipBackbone, head: AestheticMLP, device: torch.device, dtype: torch.dtype,
                 batch_size: int) -> None:
        super().__init__(device, dtype, batch_size)
        self.backbone, self.head = backbone, head.to(device).eval().requires_grad_(False)

    def score_chunk(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        pixels = torch.stack([self.backbone.preprocess(image) for image in images]).to(self.device, self.dtype)
        embedding = torch.nn.functional.normalize(self.backbone.model.encode_image(pixels).float(), dim=-1)
        return self.head(embedding)


@register_reward("aesthetic", flags=_aesthetic_flags)
def build_aesthetic_reward(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> AestheticReward:
    path = single_model_file(args.aesthetic_model, "aesthetic-model.pth", "--aesthetic_model")
    head = AestheticMLP(load_state_dict_file(path, "--aesthetic_model"), str(path))
    backbone = open_clip_backbone(args.aesthetic_clip_model, args.aesthetic_clip_pretrained, device, dtype,
                                  "--aesthetic_clip_model", "--aesthetic_clip_pretrained")
    width = backbone.model.visual.output_dim
    if width != head.in_features:
        raise ValueError(f"--aesthetic_model {path} takes {head.in_features}-dim embeddings but --aesthetic_clip_model "
                         f"{args.aesthetic_clip_model} gives {width}.")
    return AestheticReward(backbone, head, device, dtype, args.reward_batch_size)
