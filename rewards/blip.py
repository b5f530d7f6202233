"""ImageReward-v1.0's network (BLIP ViT + BERT 'med' cross-attention + MLP head) rebuilt on transformers' BLIP
classes, the conversion of its official checkpoints, and the two rewards on it: image_reward and compositional
(IterComp's three reward models, averaged)."""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from .base import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD, Reward, RewardOutput, check_batch, chunks, to_rgb, to_scores
from .model_files import resolve_model_files
from .registry import register_reward


# ==================================================================== ImageReward architecture (BLIP)
# From THUDM/ImageReward (ImageReward/ImageReward.py): scores are standardised with these statistics of
# the raw head output over their training data, and images get CLIP's 224 px bicubic preprocessing.
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
IMAGE_REWARD_TEXT_LENGTH = 35  # prompts are padded/truncated to 35 BERT tokens
_HEAD_WIDTHS = (1024, 128, 64, 16, 1)
_HEAD_INDICES = {0: 0, 2: 1, 4: 2, 6: 3, 7: 4}  # official nn.Sequential index (dropouts between) -> ours
_VIT_HEAD_DIM = 64  # BLIP's ViT-B (768/12) and ViT-L (1024/16) both use 64-dim heads; weights do not store it


def _image_reward_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--image_reward_model", default="THUDM/ImageReward",
                   help="ImageReward-v1.0: a folder (or the ImageReward.pt inside it) holding ImageReward.pt and "
                        "med_config.json, or a Hugging Face Hub repo id with those files.")
    g.add_argument("--image_reward_tokenizer", default="bert-base-uncased",
                   help="BERT tokenizer of the image_reward and compositional rewards: a hub id, a folder saved with "
                        "save_pretrained, or a vocab.txt file (BLIP adds [DEC] and [ENC] to bert-base-uncased).")


class BlipRewardModel(torch.nn.Module):
    """ImageReward's network: BLIP ViT image encoder -> BERT 'med' text encoder whose layers cross-attend
    to all image tokens -> an MLP head on the [CLS] output. Raw head output, not yet standardised."""

    def __init__(self, vision: dict[str, Any], text: dict[str, Any]) -> None:
        super().__init__()
        from transformers import BlipTextConfig, BlipVisionConfig, BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.vision = BlipVisionModel(BlipVisionConfig(**vision))
        # transformers builds BLIP's cross-attention layers only for is_decoder=True configs; the forward
        # below passes is_decoder=False, which gives the bidirectional mask of ImageReward's encoder.
        self.text = BlipTextModel(BlipTextConfig(**text, is_decoder=True), add_pooling_layer=False)
        widths = (text["hidden_size"],) + _HEAD_WIDTHS
        # The released ImageReward MLP has its ReLUs commented out, so the head is five stacked affine
        # layers; we mirror that exactly to reproduce its scores.
        self.head = torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.image_size = vision["image_size"]
        self.vocab_size = text["vocab_size"]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                         is_decoder=False, return_dict=True)
        features = text.last_hidden_state[:, 0].float()
        return self.head(features).squeeze(-1)


# Official ImageReward.pt key -> our key. Every tensor the score needs is mapped; the unused BLIP
# pretraining projections and a buffer are listed in _UNUSED_KEYS; anything else is an error.
_KEY_RULES: list[tuple[re.Pattern, str | Callable[[re.Match], str]]] = [(re.compile(p), r) for p, r in [
    (r"blip\.visual_encoder\.cls_token", "vision.embeddings.class_embedding"),
    (r"blip\.visual_encoder\.pos_embed", "vision.embeddings.position_embedding"),
    (r"blip\.visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision.embeddings.patch_embedding.\1"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.norm1\.(weight|bias)", r"vision.encoder.layers.\1.layer_norm1.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"vision.encoder.layers.\1.self_attn.qkv.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)",
     r"vision.encoder.layers.\1.self_attn.projection.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.norm2\.(weight|bias)", r"vision.encoder.layers.\1.layer_norm2.\2"),
    (r"blip\.visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision.encoder.layers.\1.mlp.\2.\3"),
    (r"blip\.visual_encoder\.norm\.(weight|bias)", r"vision.post_layernorm.\1"),
    # BLIP's med BERT and transformers' BlipTextModel share their module names.
    (r"blip\.text_encoder\.(embeddings\.(?:word_embeddings|position_embeddings|LayerNorm)\.(?:weight|bias))",
     r"text.\1"),
    (r"blip\.text_encoder\.(encoder\.layer\.\d+\.(?:attention|crossattention)\."
     r"(?:self\.(?:query|key|value)|output\.(?:dense|LayerNorm))\.(?:weight|bias))", r"text.\1"),
    (r"blip\.text_encoder\.(encoder\.layer\.\d+\.(?:intermediate\.dense|output\.dense|output\.LayerNorm)"
     r"\.(?:weight|bias))", r"text.\1"),
    (r"mlp\.layers\.([02467])\.(weight|bias)", lambda m: f"head.{_HEAD_INDICES[int(m[1])]}.{m[2]}"),
]]
_UNUSED_KEYS = frozenset({
    "blip.text_encoder.embeddings.position_ids",  # a buffer, recomputed
    "blip.vision_proj.weight", "blip.vision_proj.bias",  # BLIP's contrastive projections: not part of the score
    "blip.text_proj.weight", "blip.text_proj.bias",
})


def convert_image_reward_state_dict(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Map an official ImageReward-style state dict onto BlipRewardModel; unknown keys are an error."""
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}  # saved from DDP (IterComp)
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        if key in _UNUSED_KEYS:
            continue
        target = _map_key(key)
        if target is None:
            unexpected.append(key)
        else:
            mapped[target] = value
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} keys that are not part of the ImageReward architecture, "
                         f"e.g. {unexpected[:5]}; is this an ImageReward/IterComp reward checkpoint?")
    return mapped


def _map_key(key: str) -> str | None:
    for pattern, replacement in _KEY_RULES:
        match = pattern.fullmatch(key)
        if match:
            return replacement(match) if callable(replacement) else match.expand(replacement)
    return None


def _vision_config(state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """BLIP ViT hyper-parameters read off the weights (ViT-L/16 at 224 px for ImageReward-v1.0)."""
    try:
        width = state["vision.embeddings.class_embedding"].shape[-1]
        patch = state["vision.embeddings.patch_embedding.weight"].shape[-1]
        positions = state["vision.embeddings.position_embedding"].shape[1]
        mlp = state["vision.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as missing:
        raise ValueError(f"{source}: the image encoder weight {missing} is missing.") from None
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1 or width % _VIT_HEAD_DIM:
        raise ValueError(f"{source}: unexpected ViT shape (width {width}, {positions} positions).")
    depth = len({key.split(".")[3] for key in state if key.startswith("vision.encoder.layers.")})
    return dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth,
                num_attention_heads=width // _VIT_HEAD_DIM, image_size=grid * patch, patch_size=patch,
                hidden_act="gelu", layer_norm_eps=1e-6)  # timm ViT in BLIP: exact GELU, LayerNorm eps 1e-6


def _text_config(med_config: Path, encoder_width: int) -> dict[str, Any]:
    """BlipTextConfig arguments from BLIP's med_config.json (a BertConfig with cross-attention)."""
    try:
        med = json.loads(med_config.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{med_config}: cannot read the med config ({err}).") from None
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings")
    missing = [key for key in required if key not in med]
    if missing:
        raise ValueError(f"{med_config}: missing {missing}; expected BLIP's med_config.json.")
    if not med.get("add_cross_attention", False):
        raise ValueError(f"{med_config}: add_cross_attention is not true; ImageReward's text encoder cross-attends "
                         "to the image.")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{med_config}: only absolute position embeddings are supported.")
    text = {key: med[key] for key in required}
    text.update(hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
                pad_token_id=med.get("pad_token_id", 0),
                bos_token_id=None, eos_token_id=None, sep_token_id=None,  # generation ids: unused by the encoder
                # ImageReward overrides med's encoder_width with the ViT width.
                encoder_hidden_size=encoder_width)
    return text


def load_blip_reward_model(checkpoint: Path, med_config: Path) -> BlipRewardModel:
    """An ImageReward-architecture checkpoint (ImageReward.pt, IterComp) loaded strictly onto our modules."""
    try:
        raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{checkpoint}: cannot load the checkpoint ({type(err).__name__}: {err}).") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{checkpoint}: expected a state dict, got {type(raw).__name__}.")
    state = convert_image_reward_state_dict(raw, str(checkpoint))
    vision = _vision_config(state, str(checkpoint))
    model = BlipRewardModel(vision, _text_config(med_config, vision["hidden_size"]))
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"{checkpoint}: {len(missing)} weights of the ImageReward architecture are missing, "
                         f"e.g. {missing[:5]}.")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{checkpoint}: weights do not fit the architecture from {med_config.name}: {err}") from None
    return model.eval().requires_grad_(False)


def load_blip_tokenizer(source: str, vocab_size: int) -> Any:
    """bert-base-uncased plus BLIP's [DEC]/[ENC] tokens, checked against the text encoder's vocabulary."""
    from transformers import BertTokenizer

    path = Path(source).expanduser()
    try:
        # Positional: transformers 4 calls it vocab_file, 5 calls it vocab (a path or a dict).
        tokenizer = BertTokenizer(str(path)) if path.is_file() else BertTokenizer.from_pretrained(source)
    except Exception as err:
        raise ValueError(f"--image_reward_tokenizer {source!r}: cannot load a BERT tokenizer "
                         f"({type(err).__name__}: {err}).") from None
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    # Offline, transformers can hand back a 5-token tokenizer for a hub id without any error; a size
    # check against the checkpoint catches that and any other wrong vocabulary.
    if len(tokenizer) != vocab_size:
        raise ValueError(f"--image_reward_tokenizer {source!r} has {len(tokenizer)} tokens (with [DEC], [ENC]) but the "
                         f"reward's text encoder has {vocab_size}; pass bert-base-uncased (a local copy when offline).")
    return tokenizer


def blip_preprocess(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """ImageReward's transform: bicubic resize of the short side, centre crop, RGB, CLIP normalisation."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([Resize(image_size, interpolation=InterpolationMode.BICUBIC), CenterCrop(image_size),
                    to_rgb, ToTensor(), Normalize(CLIP_PIXEL_MEAN, CLIP_PIXEL_STD)])


class BlipReward(Reward):
    """ImageReward-style scores, (head - mean) / std; with several networks (IterComp) their mean."""

    def __init__(self, name: str, models: dict[str, BlipRewardModel], tokenizer: Any, device: torch.device,
                 dtype: torch.dtype, batch_size: int) -> None:
        sizes = {model.image_size for model in models.values()}
        if len(sizes) != 1:
            raise ValueError(f"{name}: the reward models expect different image sizes {sorted(sizes)}.")
        self.name, self.tokenizer, self.batch_size = name, tokenizer, batch_size
        self.device, self.dtype = device, dtype
        self.models = {key: model.to(device=device, dtype=dtype) for key, model in models.items()}
        for model in self.models.values():
            model.head.float()  # the head sees float32 features, as in ImageReward's score()
        self.preprocess = blip_preprocess(sizes.pop())
        self._nonfinite = 0

    @torch.no_grad()
    def evaluate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> RewardOutput:
        check_batch(images, prompts)
        per_model: dict[str, list[torch.Tensor]] = {key: [] for key in self.models}
        for s in chunks(len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(image) for image in images[s]]).to(self.device, self.dtype)
            text = self.tokenizer(list(prompts[s]), padding="max_length", truncation=True,
                                  max_length=IMAGE_REWARD_TEXT_LENGTH, return_tensors="pt")
            ids, mask = text.input_ids.to(self.device), text.attention_mask.to(self.device)
            for key, model in self.models.items():
                per_model[key].append((model(pixels, ids, mask) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD)
        scores = {key: to_scores(torch.cat(parts)) if parts else torch.zeros(0) for key, parts in per_model.items()}
        return self._output(scores)

    def _output(self, scores: dict[str, torch.Tensor]) -> RewardOutput:
        if len(scores) == 1:
            total = next(iter(scores.values()))
            components = {self.name: total}
        else:
            # IterComp weighs its reward models equally (a sum of per-model hinge losses); the mean keeps
            # that preference and ImageReward's scale, so reward-gap terms are comparable.
            total = torch.stack(list(scores.values())).mean(dim=0)
            components = {self.name: total, **{f"{self.name}/{key}": value for key, value in scores.items()}}
        self._nonfinite += int(torch.isnan(total).sum())
        return RewardOutput(total=total, components=components)

    def counters(self) -> dict[str, int]:
        return {f"{self.name}/nonfinite": self._nonfinite} if self._nonfinite else {}

    def __repr__(self) -> str:
        return (f"BlipReward(name={self.name!r}, models={list(self.models)}, device={str(self.device)!r}, "
                f"dtype={self.dtype})")


@register_reward("image_reward", flags=_image_reward_flags)
def build_image_reward(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> BlipReward:
    source = args.image_reward_model
    if Path(source).expanduser().is_file():  # the ImageReward.pt itself, med_config.json beside it
        checkpoint = Path(source).expanduser()
        (med_config,) = resolve_model_files(str(checkpoint.parent), ["med_config.json"], "--image_reward_model")
    else:
        checkpoint, med_config = resolve_model_files(source, ["ImageReward.pt", "med_config.json"],
                                                     "--image_reward_model")
    model = load_blip_reward_model(checkpoint, med_config)
    tokenizer = load_blip_tokenizer(args.image_reward_tokenizer, model.vocab_size)
    return BlipReward("image_reward", {"image_reward": model}, tokenizer, device, dtype, args.reward_batch_size)


# ======================================================================================== compositional
# IterComp (YangLing0818/IterComp) trains one ImageReward-architecture model per compositional aspect:
# attribute binding (colour, shape, texture), spatial and non-spatial relationships.
COMPOSITIONAL_FILES = {
    "attribute_binding": "attribute_binding.pt",
    "spatial_relationship": "spatial_relationship.pt",
    "non_spatial_relationship": "non_spatial_relationship.pt",
}
_COMPOSITIONAL_MISSING = (
    "the compositional reward needs --compositional_model: a folder (or hub repo id) with IterComp's three reward "
    "models saved as " + ", ".join(COMPOSITIONAL_FILES.values()) + " plus their med_config.json. IterComp's authors "
    "had not published these weights; train them with IterComp's train/train_reward_models.py (one run per aspect) "
    "and copy the best checkpoints under those names.")


def _compositional_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--compositional_model", default=None,
                   help="IterComp reward models: a folder or hub repo id holding attribute_binding.pt, "
                        "spatial_relationship.pt, non_spatial_relationship.pt and med_config.json "
                        "(checkpoints as saved by IterComp's train/train_reward_models.py); its BERT tokenizer is "
                        "--image_reward_tokenizer.")


def _check_compositional_args(args: argparse.Namespace) -> None:
    if not args.compositional_model:
        raise ValueError(_COMPOSITIONAL_MISSING)


@register_reward("compositional", flags=_compositional_flags, validate=_check_compositional_args,
                 borrows=("image_reward_tokenizer",))
def build_compositional_reward(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> BlipReward:
    if not args.compositional_model:
        raise ValueError(_COMPOSITIONAL_MISSING)
    names = list(COMPOSITIONAL_FILES.values()) + ["med_config.json"]
    *checkpoints, med_config = resolve_model_files(args.compositional_model, names, "--compositional_model")
    models = {aspect: load_blip_reward_model(path, med_config)
              for aspect, path in zip(COMPOSITIONAL_FILES, checkpoints)}
    vocab_sizes = {model.vocab_size for model in models.values()}
    if len(vocab_sizes) != 1:
        raise ValueError(f"--compositional_model: the three models have different vocabularies {sorted(vocab_sizes)}.")
    tokenizer = load_blip_tokenizer(args.image_reward_tokenizer, vocab_sizes.pop())
    return BlipReward("compositional", models, tokenizer, device, dtype, args.reward_batch_size)
