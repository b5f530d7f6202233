"""Reward models for Diffusion-Sharpening behind one interface.

    reward = build_reward("clip:1.0,image_reward:0.5", args, device)
    out = reward.evaluate(images, prompts)      # out.total: float32 [N], NaN where no score could be had
    out.components                              # unweighted score of every component, same shape

Rewards:
  clip           open_clip cosine similarity of image and prompt (ViT-L-14 OpenAI weights by default)
  image_reward   ImageReward-v1.0 (BLIP ViT-L + BERT "med" cross-attention + MLP head), rebuilt on
                 transformers' BLIP classes and loaded from the official ImageReward.pt
  compositional  IterComp's three composition-aware reward models (same architecture), averaged
  pickscore      PickScore v1 (transformers CLIP ViT-H/14): logit_scale * cosine, as its model card scores
  hpsv2          Human Preference Score v2.1 (or v2.0): open_clip ViT-H-14 cosine with HPS's transform
  aesthetic      the LAION aesthetic predictor v2: an MLP on the normalised CLIP ViT-L/14 image embedding
  mllm           an OpenAI-compatible multimodal chat model grading with the rubric in mllm_template/
  brightness, saturation, jpeg_compressibility, jpeg_incompressibility
                 pixel statistics (the prompt is ignored), for checking that an objective moves a reward at all
  toy            the toy world's caption checker (toyworld/reward.py), for `make demo` and the benchmarks

Each reward registers its factory with its own flags and checks (`register_reward(name, flags=, validate=)`);
a `--reward_plugin FILE.py` does the same for rewards of its own. The training code only uses
`parse_reward_spec`, `add_reward_args`, `build_reward` and the `Reward` interface; nothing here knows about
training. As a command, this file scores a folder of images:

    python reward.py --reward_model clip --images DIR [--prompts FILE] [--json OUT]
"""
from __future__ import annotations

import abc
import argparse
import base64
import io
import json
import logging
import math
import os
import random
import re
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parent
TEMPLATE_DIR = REPO_DIR / "mllm_template"

# Flags that hold credentials: never log them, never put them in tracker configs or model cards.
SECRET_ARG_NAMES = ("api_key",)


# ============================================================================================ interface
@dataclass
class RewardOutput:
    """Scores for a batch. `total` is what training optimises; `components` are logged separately."""

    total: torch.Tensor  # float32, CPU, shape [N]; NaN where no score could be had
    components: dict[str, torch.Tensor]  # unweighted scores, same shape; a single reward gives {name: total}


class Reward(abc.ABC):
    """A reward model: images + prompts in, one score per image out. Built once by a factory."""

    name: str = "reward"
    # Remote graders spend their time waiting on the network; a weighted mix runs them in a thread
    # while the local models compute.
    io_bound: bool = False

    @abc.abstractmethod
    def evaluate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> RewardOutput:
        """Score image i against prompt i. All images of a training step arrive in one call."""

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        return self.evaluate(images, prompts).total

    def counters(self) -> dict[str, int]:
        """Cumulative event counts for logging, e.g. {"mllm/failures": 3}."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Secret:
    """A credential whose str/repr never shows it, so printing the parsed args or a reward cannot leak it.

    Pickling keeps no value (a checkpoint that pickles the args must not contain the key); copies share it.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict) -> Secret:
        return self

    def __reduce__(self) -> tuple:
        return (Secret, ("",))


def _check_batch(images: Sequence[Image.Image], prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image.")
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        if not isinstance(image, Image.Image):
            raise TypeError(f"images[{i}] is a {type(image).__name__}, expected a PIL.Image.Image.")
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] is a {type(prompt).__name__}, expected a str.")


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _to_scores(values: torch.Tensor) -> torch.Tensor:
    """float32 CPU vector; infinities (e.g. an fp16 overflow) are not scores, so they become NaN."""
    values = values.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    return torch.where(torch.isfinite(values), values, torch.full_like(values, float("nan")))


# ============================================================================================= registry
RewardFactory = Callable[[argparse.Namespace, torch.device, torch.dtype], Reward]
FlagsHook = Callable[[argparse._ArgumentGroup], None]
ValidateHook = Callable[[argparse.Namespace], None]
REWARDS: dict[str, RewardFactory] = {}
REWARD_FLAGS: dict[str, FlagsHook] = {}  # name -> adds that reward's own flags to its argument group
REWARD_VALIDATORS: dict[str, ValidateHook] = {}  # name -> checks its flags before any model is loaded


def register_reward(name: str, *, flags: FlagsHook | None = None,
                    validate: ValidateHook | None = None) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: `@register_reward("toy", flags=add_toy_flags, validate=check) def build(args, device, dtype)`.

    `flags(group)` adds the reward's own command-line flags (every script that takes reward flags shows them,
    including those of a `--reward_plugin` file); `validate(args)` runs when the reward is selected, before
    any model is loaded. Re-registering a name is allowed only for the same function (a plugin file imported
    twice); anything else would silently replace a reward, so it raises.
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
        raise ValueError(f"reward name {name!r} must be letters, digits, '_' or '-' (it appears in --reward_model).")

    def decorator(factory: RewardFactory) -> RewardFactory:
        existing = REWARDS.get(name)
        if existing is not None and _qualname(existing) != _qualname(factory):
            raise ValueError(f"reward {name!r} is already registered by {_qualname(existing)}.")
        REWARDS[name] = factory
        if flags is not None:
            REWARD_FLAGS[name] = flags
        if validate is not None:
            REWARD_VALIDATORS[name] = validate
        return factory

    return decorator


def load_reward_plugins(paths: Sequence[str] | None) -> None:
    """Import each `--reward_plugin` file; it registers its rewards (and their flags) with `register_reward`."""
    import hashlib
    import importlib.util

    for path in paths or []:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"--reward_plugin {path!r} does not exist.")
        name = "reward_plugin_" + hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
        # Imported again on every call (registering the same functions again is allowed), so a registry
        # that was reset still gets the plugin's rewards.
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """'clip' -> [('clip', 1.0)]; 'clip:1.0,image_reward:0.5' -> two entries. Loads no model."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--reward_model is empty; valid names: {', '.join(sorted(REWARDS))}.")
    entries: list[tuple[str, float]] = []
    for part in spec.split(","):
        name, weight = _parse_spec_entry(part.strip(), spec)
        if name in (n for n, _ in entries):
            raise ValueError(f"--reward_model {spec!r} names {name!r} twice; give each reward once with its weight.")
        entries.append((name, weight))
    return entries


def _parse_spec_entry(part: str, spec: str) -> tuple[str, float]:
    if not part:
        raise ValueError(f"--reward_model {spec!r} has an empty entry; use 'name' or 'name:weight' separated by ','.")
    name, sep, weight_text = part.partition(":")
    name = name.strip()
    if name not in REWARDS:
        raise ValueError(f"--reward_model {spec!r}: unknown reward {name!r}; "
                         f"valid names: {', '.join(sorted(REWARDS))}.")
    if not sep:
        return name, 1.0
    try:
        weight = float(weight_text)
    except ValueError:
        raise ValueError(f"--reward_model {spec!r}: weight {weight_text!r} of {name!r} is not a number.") from None
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"--reward_model {spec!r}: weight of {name!r} must be a finite number > 0, "
                         f"got {weight_text!r}.")
    return name, weight


# ================================================================================================ flags
def add_reward_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> None:
    """The reward flags: the shared ones, then each registered reward's own group. `--reward_plugin` files named
    in `argv` (default: sys.argv) are imported first, so their flags are part of the parser too."""
    g = parser.add_argument_group("reward model")
    g.add_argument("--reward_model", default="clip",
                   help="Reward to optimise: one of " + ", ".join(sorted(REWARDS)) + " (or a reward registered by "
                        "--reward_plugin), or a weighted sum such as 'clip:1.0,image_reward:0.5' (components are "
                        "logged separately).")
    g.add_argument("--reward_batch_size", type=int, default=32,
                   help="Images per forward pass of the local reward models (clip, pickscore, hpsv2, aesthetic, "
                        "image_reward, compositional).")
    g.add_argument("--reward_plugin", action="append", default=[], metavar="FILE.py",
                   help="A Python file that registers extra rewards with reward.register_reward (and may add their "
                        "flags); repeatable.")
    load_reward_plugins(_plugin_paths(sys.argv[1:] if argv is None else argv))
    for name, add_flags in REWARD_FLAGS.items():
        add_flags(parser.add_argument_group(f"reward: {name}"))


def _plugin_paths(argv: Sequence[str]) -> list[str]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--reward_plugin", action="append", default=[])
    return pre.parse_known_args(list(argv))[0].reward_plugin


def _clip_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--clip_model", default="ViT-L-14",
                   help="open_clip architecture for the clip reward (e.g. ViT-L-14, ViT-L-14-quickgelu, ViT-H-14), "
                        "or 'hf-hub:org/repo' / 'local-dir:/path' with an open_clip config.")
    g.add_argument("--clip_pretrained", default="openai",
                   help="open_clip weights: a pretrained tag of --clip_model (default 'openai', the paper's CLIP) or a "
                        "local checkpoint file. For a local copy of OpenAI weights use --clip_model "
                        "ViT-L-14-quickgelu, since a file does not say which activation it was trained with.")


def _image_reward_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--image_reward_model", default="THUDM/ImageReward",
                   help="ImageReward-v1.0: a folder (or the ImageReward.pt inside it) holding ImageReward.pt and "
                        "med_config.json, or a Hugging Face Hub repo id with those files.")
    g.add_argument("--image_reward_tokenizer", default="bert-base-uncased",
                   help="BERT tokenizer of the image_reward and compositional rewards: a hub id, a folder saved with "
                        "save_pretrained, or a vocab.txt file (BLIP adds [DEC] and [ENC] to bert-base-uncased).")


def _compositional_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--compositional_model", default=None,
                   help="IterComp reward models: a folder or hub repo id holding attribute_binding.pt, "
                        "spatial_relationship.pt, non_spatial_relationship.pt and med_config.json "
                        "(checkpoints as saved by IterComp's train/train_reward_models.py); its BERT tokenizer is "
                        "--image_reward_tokenizer.")


def _mllm_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--api_key", type=Secret, default=None,
                   help="Key for the mllm grader. Prefer the OPENAI_API_KEY environment variable: a key on the command "
                        "line is visible to other users of the machine. Never logged or saved.")
    g.add_argument("--base_url", default=None,
                   help="OpenAI-compatible endpoint for the mllm grader, e.g. http://localhost:8000/v1 for vLLM or "
                        "http://localhost:11434/v1 for Ollama (default: OPENAI_BASE_URL or api.openai.com).")
    g.add_argument("--mllm_model", default="gpt-4o", help="Model name sent to the chat completions endpoint.")
    g.add_argument("--mllm_template", default="default",
                   help="Grading prompt: a name in mllm_template/ (without .txt) or a path to a text file containing "
                        "{prompt}. The reply must be a JSON object with 'overall' or the five aspect scores, 0-100.")
    g.add_argument("--mllm_concurrency", type=int, default=16, help="Grader requests in flight at once.")
    g.add_argument("--mllm_timeout", type=float, default=60.0, help="Seconds before one grader request is abandoned.")
    g.add_argument("--mllm_max_retries", type=int, default=3,
                   help="Retries of a grader request after a timeout, connection error, 408/409/429 or 5xx; "
                        "an image whose request still fails scores NaN (counted in mllm/failures).")
    g.add_argument("--mllm_retry_backoff", type=float, default=1.0,
                   help="Base seconds of the exponential backoff between retries (a Retry-After header wins).")
    g.add_argument("--mllm_max_backoff", type=float, default=60.0, help="Longest wait between two retries, in seconds.")
    g.add_argument("--mllm_max_tokens", type=int, default=1000, help="max_tokens of each grader reply (paper: 1000).")
    g.add_argument("--mllm_temperature", type=float, default=0.0,
                   help="Sampling temperature of the grader; 0 makes the reward as repeatable as the server allows.")
    g.add_argument("--mllm_response_format", choices=("json_object", "none"), default="json_object",
                   help="Ask the server for JSON mode; use 'none' for servers that reject response_format.")


def _reward_defaults() -> dict[str, Any]:
    """Every reward flag at its default, including those of rewards registered since the last call."""
    parser = argparse.ArgumentParser(add_help=False)
    add_reward_args(parser, argv=[])
    return vars(parser.parse_args([]))


def _complete_args(args: argparse.Namespace | None) -> argparse.Namespace:
    """The given flags over the reward defaults, so callers may pass a partial Namespace."""
    merged = _reward_defaults()
    merged.update(vars(args) if args is not None else {})
    return argparse.Namespace(**merged)


def validate_reward_args(args: argparse.Namespace) -> None:
    """Checks that need no model: the spec, numeric ranges, and what each selected reward needs."""
    args = _complete_args(args)
    names = [name for name, _ in parse_reward_spec(args.reward_model)]
    if args.reward_batch_size < 1:
        raise ValueError("--reward_batch_size must be >= 1.")
    for name in names:
        if name in REWARD_VALIDATORS:
            REWARD_VALIDATORS[name](args)


def build_reward(spec: str, args: argparse.Namespace | None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Reward:
    """Load every reward in `spec` once; a weighted sum when there are several or a weight != 1."""
    args = _complete_args(args)
    entries = parse_reward_spec(spec)
    validate_reward_args(argparse.Namespace(**{**vars(args), "reward_model": spec}))
    device = torch.device(device)
    parts = [(REWARDS[name](args, device, dtype), weight) for name, weight in entries]
    if len(parts) == 1 and parts[0][1] == 1.0:
        return parts[0][0]
    return WeightedSumReward(parts)


# ========================================================================================= weighted sum
class WeightedSumReward(Reward):
    """total = sum_i w_i * c_i (a NaN in any component makes the total NaN: no made-up score)."""

    def __init__(self, parts: list[tuple[Reward, float]]) -> None:
        names = [reward.name for reward, _ in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique in a mix, got {names}.")
        self.parts = parts
        self.name = ",".join(f"{reward.name}:{weight:g}" for reward, weight in parts)

    def evaluate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> RewardOutput:
        _check_batch(images, prompts)
        outputs = self._evaluate_parts(list(images), list(prompts))
        total = torch.zeros(len(images), dtype=torch.float32)
        components: dict[str, torch.Tensor] = {}
        for reward, weight in self.parts:
            out = outputs[reward.name]
            total = total + weight * out.total.to(device="cpu", dtype=torch.float32)
            components.update(out.components)
        return RewardOutput(total=total, components=components)

    def _evaluate_parts(self, images: list[Image.Image], prompts: list[str]) -> dict[str, RewardOutput]:
        remote = [reward for reward, _ in self.parts if reward.io_bound]
        local = [reward for reward, _ in self.parts if not reward.io_bound]
        outputs: dict[str, RewardOutput] = {}
        if not remote:
            return {reward.name: reward.evaluate(images, prompts) for reward in local}
        with ThreadPoolExecutor(max_workers=len(remote), thread_name_prefix="reward-remote") as pool:
            futures = {reward.name: pool.submit(reward.evaluate, images, prompts) for reward in remote}
            for reward in local:
                outputs[reward.name] = reward.evaluate(images, prompts)
            for name, future in futures.items():
                outputs[name] = future.result()
        return outputs

    def counters(self) -> dict[str, int]:
        merged: dict[str, int] = {}
        for reward, _ in self.parts:
            merged.update(reward.counters())
        return merged

    def __repr__(self) -> str:
        return f"WeightedSumReward({', '.join(f'{r!r} * {w:g}' for r, w in self.parts)})"


# ================================================================================================= CLIP
class ClipReward(Reward):
    """Cosine similarity of normalised open_clip image and text embeddings (about 0.33 for a good
    SDXL image with ViT-L-14: the paper's reporting scale, not the upstream's x100)."""

    name = "clip"

    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, device: torch.device,
                 dtype: torch.dtype, batch_size: int) -> None:
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self._nonfinite = 0

    @torch.no_grad()
    def evaluate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> RewardOutput:
        _check_batch(images, prompts)
        scores = [self._score_chunk(images[s], prompts[s]) for s in _chunks(len(images), self.batch_size)]
        total = _to_scores(torch.cat(scores)) if scores else torch.zeros(0)
        self._nonfinite += int(torch.isnan(total).sum())
        return RewardOutput(total=total, components={self.name: total})

    def _score_chunk(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        # open_clip's tokenizers truncate to the context length (keeping the end-of-text token), so
        # long JourneyDB/DiffusionDB prompts are scored on their first 77 tokens instead of crashing (B10).
        tokens = self.tokenizer(list(prompts)).to(self.device)
        image_features = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text_features = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return (image_features * text_features).sum(dim=-1)

    def counters(self) -> dict[str, int]:
        return {"clip/nonfinite": self._nonfinite} if self._nonfinite else {}

    def __repr__(self) -> str:
        return f"ClipReward(device={str(self.device)!r}, dtype={self.dtype}, batch_size={self.batch_size})"


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
    if dtype not in _OPEN_CLIP_PRECISION:
        raise ValueError(f"{model_flag}: unsupported dtype {dtype}; use float32, float16 or bfloat16.")
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, device=device, precision=_OPEN_CLIP_PRECISION[dtype], **kwargs)
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
        pixels = TF.to_tensor(_to_rgb(image))
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


def load_state_dict_file(path: Path, flag: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint saved with torch.save (a state dict, or a dict with 'state_dict'), 'module.' removed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{flag}: cannot read {path} as a PyTorch state dict ({type(err).__name__}: {err}).") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{flag}: {path} does not hold a state dict of tensors.")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _single_file(source: str, filename: str, flag: str) -> Path:
    """A checkpoint given as the file itself, or as a folder / hub repo holding `filename`."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    return resolve_model_files(source, [filename], flag)[0]


class OpenClipCosineReward(Reward):
    """Cosine of normalised open_clip image and prompt embeddings, with the reward's own image transform."""

    def __init__(self, name: str, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable,
                 device: torch.device, dtype: torch.dtype, batch_size: int) -> None:
        self.name, self.model, self.preprocess, self.tokenizer = name, model, preprocess, tokenizer
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self._nonfinite = 0

    @torch.no_grad()
    def evaluate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> RewardOutput:
        _check_batch(images, prompts)
        scores = []
        for s in _chunks(len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(image) for image in images[s]]).to(self.device, self.dtype)
            tokens = self.tokenizer(list(prompts[s])).to(self.device)
            image_features = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
            text_features = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)
            scores.append((image_features * text_features).sum(dim=-1))
        total = _to_scores(torch.cat(scores)) if scores else torch.zeros(0)
        self._nonfinite += int(torch.isnan(total).sum())
        return RewardOutput(total=total, components={self.name: total})

    def counters(self) -> dict[str, int]:
        return {f"{self.name}/nonfinite": self._nonfinite} if self._nonfinite else {}


@register_reward("hpsv2", flags=_hpsv2_flags)
def build_hpsv2_reward(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> OpenClipCosineReward:
    import open_clip

    if args.hpsv2_clip_model not in open_clip.list_models():
        raise ValueError(f"--hpsv2_clip_model {args.hpsv2_clip_model!r} is not an open_clip architecture.")
    checkpoint = _single_file(args.hpsv2_checkpoint, HPS_CHECKPOINTS[args.hpsv2_version], "--hpsv2_checkpoint")
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
    return OpenClipCosineReward("hpsv2", model, hps_preprocess(int(size)), open_clip.get_tokenizer(args.hpsv2_clip_model),
                                device, dtype, args.reward_batch_size)


# ============================================================================================ PickScore
# PickScore v1 (Kirstain et al., arXiv 2305.01569): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences,
# scored as in its model card: logit_scale.exp() * cosine(image, prompt), about 20-23 for typical images.
def _pickscore_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--pickscore_model", default="yuvalkirstain/PickScore_v1",
                   help="PickScore weights (a transformers CLIPModel): hub id or local folder.")
    g.add_argument("--pickscore_processor", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                   help="Its processor (image transform and tokenizer): hub id or local folder.")


class PickScoreReward(Reward):
    name = "pickscore"

    def __init__(self, model: Any, processor: Any, device: torch.device, dtype: torch.dtype, batch_size: int) -> None:
        self.model, self.processor = model, processor
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self._nonfinite = 0

    @torch.no_grad()
    def evaluate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> RewardOutput:
        _check_batch(images, prompts)
        scores = []
        for s in _chunks(len(images), self.batch_size):
            pixels = self.processor(images=[_to_rgb(image) for image in images[s]], return_tensors="pt").pixel_values
            text = self.processor(text=list(prompts[s]), padding=True, truncation=True, max_length=77, return_tensors="pt")
            image_embeds = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
            text_embeds = _pooled(self.model.get_text_features(input_ids=text.input_ids.to(self.device),
                                                               attention_mask=text.attention_mask.to(self.device)))
            cosine = (torch.nn.functional.normalize(image_embeds.float(), dim=-1)
                      * torch.nn.functional.normalize(text_embeds.float(), dim=-1)).sum(dim=-1)
            scores.append(self.model.logit_scale.float().exp() * cosine)
        total = _to_scores(torch.cat(scores)) if scores else torch.zeros(0)
        self._nonfinite += int(torch.isnan(total).sum())
        return RewardOutput(total=total, components={self.name: total})

    def counters(self) -> dict[str, int]:
        return {"pickscore/nonfinite": self._nonfinite} if self._nonfinite else {}


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
    g.add_argument("--aesthetic_clip_pretrained", default="openai", help="Its weights: an open_clip tag or a file.")


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


class AestheticReward(Reward):
    name = "aesthetic"

    def __init__(self, backbone: OpenClipBackbone, head: AestheticMLP, device: torch.device, dtype: torch.dtype,
                 batch_size: int) -> None:
        self.backbone, self.head = backbone, head.to(device).eval().requires_grad_(False)
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self._nonfinite = 0

    @torch.no_grad()
    def evaluate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> RewardOutput:
        _check_batch(images, prompts)
        scores = []
        for s in _chunks(len(images), self.batch_size):
            pixels = torch.stack([self.backbone.preprocess(image) for image in images[s]]).to(self.device, self.dtype)
            embedding = torch.nn.functional.normalize(self.backbone.model.encode_image(pixels).float(), dim=-1)
            scores.append(self.head(embedding))
        total = _to_scores(torch.cat(scores)) if scores else torch.zeros(0)
        self._nonfinite += int(torch.isnan(total).sum())
        return RewardOutput(total=total, components={self.name: total})

    def counters(self) -> dict[str, int]:
        return {"aesthetic/nonfinite": self._nonfinite} if self._nonfinite else {}


@register_reward("aesthetic", flags=_aesthetic_flags)
def build_aesthetic_reward(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> AestheticReward:
    path = _single_file(args.aesthetic_model, "aesthetic-model.pth", "--aesthetic_model")
    head = AestheticMLP(load_state_dict_file(path, "--aesthetic_model"), str(path))
    backbone = open_clip_backbone(args.aesthetic_clip_model, args.aesthetic_clip_pretrained, device, dtype,
                                  "--aesthetic_clip_model", "--aesthetic_clip_pretrained")
    width = backbone.model.visual.output_dim
    if width != head.in_features:
        raise ValueError(f"--aesthetic_model {path} takes {head.in_features}-dim embeddings but --aesthetic_clip_model "
                         f"{args.aesthetic_clip_model} gives {width}.")
    return AestheticReward(backbone, head, device, dtype, args.reward_batch_size)


# ==================================================================== ImageReward architecture (BLIP)
# From THUDM/ImageReward (ImageReward/ImageReward.py): scores are standardised with these statistics of
# the raw head output over their training data, and images get CLIP's 224 px bicubic preprocessing.
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
IMAGE_REWARD_TEXT_LENGTH = 35  # prompts are padded/truncated to 35 BERT tokens
CLIP_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
_HEAD_WIDTHS = (1024, 128, 64, 16, 1)
_HEAD_INDICES = {0: 0, 2: 1, 4: 2, 6: 3, 7: 4}  # official nn.Sequential index (dropouts between) -> ours
_VIT_HEAD_DIM = 64  # BLIP's ViT-B (768/12) and ViT-L (1024/16) both use 64-dim heads; weights do not store it


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
                    _to_rgb, ToTensor(), Normalize(CLIP_PIXEL_MEAN, CLIP_PIXEL_STD)])


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


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
        _check_batch(images, prompts)
        per_model: dict[str, list[torch.Tensor]] = {key: [] for key in self.models}
        for s in _chunks(len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(image) for image in images[s]]).to(self.device, self.dtype)
            text = self.tokenizer(list(prompts[s]), padding="max_length", truncation=True,
                                  max_length=IMAGE_REWARD_TEXT_LENGTH, return_tensors="pt")
            ids, mask = text.input_ids.to(self.device), text.attention_mask.to(self.device)
            for key, model in self.models.items():
                per_model[key].append((model(pixels, ids, mask) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD)
        scores = {key: _to_scores(torch.cat(parts)) if parts else torch.zeros(0) for key, parts in per_model.items()}
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


def resolve_model_files(source: str, filenames: Sequence[str], flag: str) -> list[Path]:
    """Files from a local folder, or downloaded from a Hugging Face Hub repo id (cached)."""
    path = Path(source).expanduser()
    if path.is_dir():
        missing = [name for name in filenames if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{flag} {source!r}: the folder lacks {', '.join(missing)} "
                                    f"(needs {', '.join(filenames)}).")
        return [path / name for name in filenames]
    if path.exists() or not re.fullmatch(r"[\w.\-]+/[\w.\-]+", source):
        raise FileNotFoundError(f"{flag} {source!r} is neither a folder nor a Hugging Face Hub repo id.")
    # not a local folder but shaped like "org/name": try the hub (its cache first)
    from huggingface_hub import hf_hub_download

    files = []
    for name in filenames:
        try:
            files.append(Path(hf_hub_download(repo_id=source, filename=name)))
        except Exception as err:
            raise RuntimeError(f"{flag} {source!r}: no such local folder, and cannot get {name} from the Hugging "
                               f"Face Hub ({type(err).__name__}: {err}). Without network, download "
                               f"{', '.join(filenames)} elsewhere and pass the local folder.") from None
    return files


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


def _check_compositional_args(args: argparse.Namespace) -> None:
    if not args.compositional_model:
        raise ValueError(_COMPOSITIONAL_MISSING)


@register_reward("compositional", flags=_compositional_flags, validate=_check_compositional_args)
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


# ========================================================================================= MLLM grader
# The paper's rubric (Appendix C): five aspects, each 0-100, and an overall score; normalised to [0, 1].
MLLM_ASPECTS = (
    "accuracy_to_prompt",
    "creativity_and_originality",
    "visual_quality_and_realism",
    "consistency_and_cohesion",
    "emotional_or_thematic_resonance",
)
MLLM_SCORE_MAX = 100.0
_RETRYABLE_STATUS = frozenset({408, 409, 429})  # and every 5xx
_FATAL_STATUS = {401: "the API key was rejected (set OPENAI_API_KEY or --api_key)",
                 403: "access denied for this key or model (--mllm_model, --api_key)",
                 404: "no such model or endpoint (--mllm_model, --base_url)"}
_KEY_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-*]{6,}")


class GradeParseError(ValueError):
    """The grader's reply holds no usable score."""


def parse_grade(text: str) -> float:
    """The normalised score in [0, 1] from a grader reply: a JSON object, possibly in a ```json fence.

    Uses "overall", or the mean of the five aspects when overall is absent. Any score outside 0-100
    rejects the reply: a guess (the upstream's last number in the text, or 7.0) would be a made-up reward.
    """
    obj = _extract_json_object(text)
    fields = {_normalise_key(key): value for key, value in obj.items()}
    for key in ("overall", "overall_score"):
        if key in fields:
            return _score_value(fields[key], "overall") / MLLM_SCORE_MAX
    missing = [aspect for aspect in MLLM_ASPECTS if aspect not in fields]
    if missing:
        raise GradeParseError(f"no 'overall' and aspects missing: {missing}")
    return sum(_score_value(fields[aspect], aspect) for aspect in MLLM_ASPECTS) / len(MLLM_ASPECTS) / MLLM_SCORE_MAX


def _extract_json_object(text: str) -> dict:
    if not isinstance(text, str) or not text.strip():
        raise GradeParseError("empty reply")
    fenced = re.findall(r"```(?:json|JSON)?\s*(.*?)```", text, flags=re.DOTALL)
    decoder = json.JSONDecoder()
    for candidate in [*fenced, text]:
        candidate = candidate.strip()
        for start in [i for i, ch in enumerate(candidate) if ch == "{"]:
            try:
                obj, _ = decoder.raw_decode(candidate, start)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    raise GradeParseError("no complete JSON object in the reply")


def _normalise_key(key: Any) -> str:
    """'Accuracy to Prompt', 'creativity & originality' -> 'accuracy_to_prompt', 'creativity_and_originality'."""
    return re.sub(r"[^a-z0-9]+", "_", str(key).lower().replace("&", " and ")).strip("_")


def _score_value(value: Any, name: str) -> float:
    if isinstance(value, dict):
        if "score" not in value:
            raise GradeParseError(f"{name!r} has no 'score'")
        value = value["score"]
    if isinstance(value, bool):
        raise GradeParseError(f"{name!r} is a boolean")
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+(\.\d+)?\s*", value):
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GradeParseError(f"{name!r} is not a number: {value!r}")
    if not 0.0 <= value <= MLLM_SCORE_MAX:
        raise GradeParseError(f"{name!r} = {value} is outside 0-{MLLM_SCORE_MAX:g}")
    return float(value)


def load_mllm_template(name_or_path: str) -> str:
    """A template name in mllm_template/ or a file path; it must contain {prompt}."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        path = TEMPLATE_DIR / f"{name_or_path}.txt"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in TEMPLATE_DIR.glob("*.txt")))
        raise FileNotFoundError(f"--mllm_template {name_or_path!r}: no such file, nor a template in {TEMPLATE_DIR} "
                                f"(available: {names}).")
    template = path.read_text(encoding="utf-8")
    if "{prompt}" not in template:
        raise ValueError(f"--mllm_template {path}: the template must contain {{prompt}}.")
    return template


def encode_image_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class MllmRequestError(RuntimeError):
    """A grader request that cannot succeed by retrying (bad key, unknown model)."""


class MllmReward(Reward):
    """Grades each image with a multimodal chat model; requests run concurrently with bounded retries.

    A request that still fails, or a reply without a valid score, gives NaN and counts in counters().
    """

    name = "mllm"
    io_bound = True

    def __init__(self, client: Any, *, model: str, template: str, concurrency: int, timeout: float,
                 max_retries: int, backoff: float, max_backoff: float, max_tokens: int, temperature: float,
                 json_mode: bool, base_url: str | None, secret: Secret | None) -> None:
        self.client, self.model, self.template = client, model, template
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.max_tokens, self.temperature, self.json_mode = max_tokens, temperature, json_mode
        self.base_url = strip_userinfo(base_url)
        self._secret = secret  # only to scrub it from error text; its repr is masked
        self._counts = {"requests": 0, "retries": 0, "failures": 0, "request_failures": 0, "parse_failures": 0}
        self._lock = threading.Lock()

    def evaluate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> RewardOutput:
        _check_batch(images, prompts)
        if not images:
            empty = torch.zeros(0)
            return RewardOutput(total=empty, components={self.name: empty})
        scores = self._grade_all(list(images), list(prompts))
        total = torch.tensor(scores, dtype=torch.float32)
        return RewardOutput(total=total, components={self.name: total})

    def _grade_all(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """Grade with `concurrency` worker threads. A fatal error (rejected key, unknown model) raises at once:
        no new request starts, and requests still in flight are abandoned (daemon threads) instead of awaited, so
        a run with a bad key stops in about one round trip, on every rank that sees it."""
        scores: list[float] = [float("nan")] * len(images)
        pending = iter(range(len(images)))
        lock, finished, failure = threading.Lock(), threading.Event(), []
        remaining = [len(images)]

        def work() -> None:
            while not failure:
                with lock:
                    index = next(pending, None)
                if index is None:
                    return
                try:
                    scores[index] = self._grade(images[index], prompts[index], index)
                except BaseException as err:  # MllmRequestError, or a bug: stop everything
                    failure.append(err)
                    finished.set()
                    return
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        finished.set()

        for _ in range(min(self.concurrency, len(images))):
            threading.Thread(target=work, name="mllm", daemon=True).start()
        finished.wait()
        if failure:
            raise failure[0]
        return scores

    def _grade(self, image: Image.Image, prompt: str, index: int) -> float:
        reply = self._request(self._messages(image, prompt), index)
        if reply is None:
            return float("nan")
        try:
            return parse_grade(reply)
        except GradeParseError as err:
            self._count("failures", "parse_failures")
            logger.warning("mllm: unusable reply for image %d (%s): %r; scoring it NaN.", index, err,
                           self._scrub(reply[:200]))
            return float("nan")

    def _messages(self, image: Image.Image, prompt: str) -> list[dict]:
        text = self.template.replace("{prompt}", prompt)
        return [{"role": "user", "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": encode_image_data_url(image)}},
        ]}]

    def _request(self, messages: list[dict], index: int) -> str | None:
        """The reply text, or None once the retries are spent (counted and logged)."""
        import openai

        extra: dict[str, Any] = {"response_format": {"type": "json_object"}} if self.json_mode else {}
        last_error = "no attempt"
        for attempt in range(self.max_retries + 1):
            self._count("requests")
            if attempt:
                self._count("retries")
            headers = None
            try:
                response = self.client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=self.max_tokens, temperature=self.temperature,
                    timeout=self.timeout, **extra)
                return _reply_text(response)
            except openai.APIStatusError as err:
                if err.status_code in _FATAL_STATUS:
                    raise MllmRequestError(f"mllm grader: HTTP {err.status_code}, {_FATAL_STATUS[err.status_code]}: "
                                           f"{self._scrub(str(err))[:300]}") from None
                if err.status_code not in _RETRYABLE_STATUS and err.status_code < 500:
                    last_error = f"HTTP {err.status_code}: {self._scrub(str(err))[:300]}"
                    break  # a bad request stays bad
                last_error, headers = f"HTTP {err.status_code}", err.response.headers
            except (openai.APIConnectionError, openai.APIResponseValidationError, _EmptyReply,
                    json.JSONDecodeError) as err:
                # timeouts, refused connections, bodies that are not a chat completion: transient
                last_error = f"{type(err).__name__}: {self._scrub(str(err))[:200]}"
            if attempt < self.max_retries:
                time.sleep(self._retry_delay(attempt, headers))
        self._count("failures", "request_failures")
        logger.warning("mllm: request for image %d failed (%s) after %d attempt(s); scoring it NaN.",
                       index, last_error, attempt + 1)
        return None

    def _retry_delay(self, attempt: int, headers: Any) -> float:
        server_says = retry_after_seconds(headers)
        if server_says is not None:
            return min(server_says, self.max_backoff)
        # exponential backoff with jitter, so concurrent requests do not retry in lockstep
        return min(self.backoff * 2 ** attempt, self.max_backoff) * random.uniform(0.5, 1.0)

    def _count(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._counts[key] += 1

    def _scrub(self, text: str) -> str:
        if self._secret and self._secret.reveal():
            text = text.replace(self._secret.reveal(), "***")
        return _KEY_PATTERN.sub("sk-***", text)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {f"mllm/{key}": value for key, value in self._counts.items()}

    def __repr__(self) -> str:
        return (f"MllmReward(model={self.model!r}, base_url={self.base_url!r}, concurrency={self.concurrency}, "
                f"timeout={self.timeout}, max_retries={self.max_retries})")


class _EmptyReply(Exception):
    """A 200 response without a message text."""


def _reply_text(response: Any) -> str:
    choices = getattr(response, "choices", None)
    if not choices or getattr(choices[0], "message", None) is None or not choices[0].message.content:
        raise _EmptyReply("the response has no message content")
    return choices[0].message.content


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds the server asks us to wait: retry-after-ms, or retry-after as seconds or an HTTP date."""
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(float(value) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


def strip_userinfo(url: str | None) -> str | None:
    if not url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _api_key(args: argparse.Namespace) -> Secret | None:
    key = args.api_key
    if isinstance(key, str):  # a Namespace built in code rather than by add_reward_args
        key = Secret(key)
    if key:
        return key
    env = os.environ.get("OPENAI_API_KEY", "")
    return Secret(env) if env else None


def _check_mllm_args(args: argparse.Namespace) -> None:
    if args.mllm_concurrency < 1:
        raise ValueError("--mllm_concurrency must be >= 1.")
    if not args.mllm_timeout > 0:
        raise ValueError("--mllm_timeout must be > 0 seconds.")
    if args.mllm_max_retries < 0:
        raise ValueError("--mllm_max_retries must be >= 0.")
    if args.mllm_retry_backoff < 0 or args.mllm_max_backoff < 0:
        raise ValueError("--mllm_retry_backoff and --mllm_max_backoff must be >= 0.")
    if _api_key(args) is None and not (args.base_url or os.environ.get("OPENAI_BASE_URL")):
        raise ValueError("the mllm reward needs an API key: set OPENAI_API_KEY (preferred) or pass --api_key; for a "
                         "local OpenAI-compatible server without authentication pass --base_url.")
    template = load_mllm_template(args.mllm_template)
    if args.mllm_response_format == "json_object" and "json" not in template.lower():
        raise ValueError(f"--mllm_template {args.mllm_template!r} never mentions JSON, which OpenAI's JSON mode "
                         "requires; say so in the template or pass --mllm_response_format none.")


@register_reward("mllm", flags=_mllm_flags, validate=_check_mllm_args)
def build_mllm_reward(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> MllmReward:
    import openai

    _check_mllm_args(args)
    secret = _api_key(args)
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL") or None
    # Local servers (vLLM, Ollama) accept any key, but the client refuses to start without one.
    client = openai.OpenAI(api_key=secret.reveal() if secret else "EMPTY", base_url=base_url,
                           timeout=args.mllm_timeout, max_retries=0)  # our own retry loop counts and bounds retries
    return MllmReward(client, model=args.mllm_model, template=load_mllm_template(args.mllm_template),
                      concurrency=args.mllm_concurrency, timeout=args.mllm_timeout,
                      max_retries=args.mllm_max_retries, backoff=args.mllm_retry_backoff,
                      max_backoff=args.mllm_max_backoff, max_tokens=args.mllm_max_tokens,
                      temperature=args.mllm_temperature, json_mode=args.mllm_response_format == "json_object",
                      base_url=base_url, secret=secret)


# ============================================================================================= command
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_scoring_items(images_dir: Path, prompts_file: Path | None) -> list[tuple[Path, str]]:
    """(image path, prompt) pairs from --prompts (one line per image, sorted file names) or DIR/metadata.jsonl."""
    if not images_dir.is_dir():
        raise FileNotFoundError(f"--images {images_dir}: no such folder.")
    if prompts_file is not None:
        return _items_from_prompt_lines(images_dir, prompts_file)
    metadata = images_dir / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(f"no prompts: pass --prompts FILE (one line per image) or put metadata.jsonl with "
                                f"file_name and text columns in {images_dir}.")
    return _items_from_metadata(images_dir, metadata)


def _items_from_prompt_lines(images_dir: Path, prompts_file: Path) -> list[tuple[Path, str]]:
    if not prompts_file.is_file():
        raise FileNotFoundError(f"--prompts {prompts_file}: no such file.")
    prompts = prompts_file.read_text(encoding="utf-8").splitlines()
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"--images {images_dir} holds no {'/'.join(IMAGE_SUFFIXES)} files.")
    if len(prompts) != len(images):
        raise ValueError(f"--prompts {prompts_file} has {len(prompts)} lines but {images_dir} has {len(images)} "
                         "images; give one prompt per image, in sorted file-name order.")
    return list(zip(images, prompts))


def _items_from_metadata(images_dir: Path, metadata: Path) -> list[tuple[Path, str]]:
    items = []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{metadata}:{number}: not valid JSON ({err.msg}).") from None
        missing = [column for column in ("file_name", "text") if not isinstance(row, dict) or column not in row]
        if missing:
            raise ValueError(f"{metadata}:{number}: missing column(s) {missing}; each line needs file_name and text.")
        path = images_dir / str(row["file_name"])
        if not path.is_file():
            raise FileNotFoundError(f"{metadata}:{number}: image {row['file_name']!r} not found in {images_dir}.")
        items.append((path, str(row["text"])))
    if not items:
        raise ValueError(f"{metadata} lists no images.")
    return items


def score_items(reward: Reward, items: list[tuple[Path, str]], chunk: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for s in _chunks(len(items), chunk):
        batch = items[s]
        images = []
        for path, _ in batch:
            try:
                with Image.open(path) as image:
                    image.load()
                    images.append(image.copy())
            except (OSError, SyntaxError) as err:  # PIL raises these for truncated or non-image files
                raise ValueError(f"{path}: cannot read the image ({err}).") from None
        out = reward.evaluate(images, [prompt for _, prompt in batch])
        for i, (path, prompt) in enumerate(batch):
            row: dict[str, Any] = {"file": path.name, "prompt": prompt}
            row.update({name: float(values[i]) for name, values in out.components.items()})
            row["total"] = float(out.total[i])
            rows.append(row)
    return rows


def _column_means(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, float]:
    means = {}
    for column in columns:
        finite = [row[column] for row in rows if math.isfinite(row[column])]
        means[column] = sum(finite) / len(finite) if finite else float("nan")
    return means


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = [key for key in rows[0] if key not in ("file", "prompt")]
    header = ["file", "prompt", *columns]
    body = [[row["file"], _clip_text(row["prompt"], 48), *(f"{row[c]:.4f}" for c in columns)] for row in rows]
    means = _column_means(rows, columns)
    nans = sum(1 for row in rows if not math.isfinite(row["total"]))
    body.append([f"mean ({len(rows)} images, {nans} NaN)", "", *(f"{means[c]:.4f}" for c in columns)])
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.insert(len(lines) - 1, lines[1])
    return "\n".join(lines)


def _clip_text(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_json(path: Path, reward: Reward, rows: list[dict[str, Any]]) -> None:
    columns = [key for key in rows[0] if key not in ("file", "prompt")]
    document = {
        "reward_model": reward.name,
        "mean": {key: _json_safe(value) for key, value in _column_means(rows, columns).items()},
        "counters": reward.counters(),
        "results": [{key: _json_safe(value) for key, value in row.items()} for row in rows],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a crash never leaves half a file


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Score a folder of images against their prompts with a reward model.")
    add_reward_args(parser, argv)
    g = parser.add_argument_group("scoring a folder")
    g.add_argument("--images", type=Path, required=True, help="Folder of images to score.")
    g.add_argument("--prompts", type=Path, default=None,
                   help="Text file with one prompt per image, in sorted file-name order. Without it, IMAGES/"
                        "metadata.jsonl (columns file_name, text) is used.")
    g.add_argument("--json", type=Path, default=None, help="Also write the results and means to this JSON file.")
    g.add_argument("--device", default=None, help="Torch device (default: cuda if available, else cpu).")
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="Weights dtype of local models.")
    g.add_argument("--chunk_size", type=int, default=64, help="Images loaded and scored per evaluate() call.")
    args = parser.parse_args(argv)
    try:
        validate_reward_args(args)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.chunk_size < 1:
        parser.error("--chunk_size must be >= 1.")
    return args


# ===================================================================================== pixel statistics
class PixelStatisticReward(Reward):
    """A reward computed from the pixels alone (the prompt is ignored): cheap, exact and easy to hack, which is
    what makes such rewards useful for checking that a training objective moves a reward at all (DDPO, arXiv
    2305.13301, trains on JPEG (in)compressibility for the same reason)."""

    def __init__(self, name: str, statistic: Callable[[Image.Image], float]) -> None:
        self.name, self._statistic = name, statistic
        self.images_scored = 0

    def evaluate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> RewardOutput:
        _check_batch(images, prompts)
        self.images_scored += len(images)
        total = torch.tensor([self._statistic(image) for image in images], dtype=torch.float32)
        return RewardOutput(total=total, components={self.name: total})

    def counters(self) -> dict[str, int]:
        return {f"{self.name}/images_scored": self.images_scored}


def jpeg_kilobytes(image: Image.Image) -> float:
    """Size of the image as a quality-95 JPEG in kB (1000 bytes), as DDPO's compressibility rewards measure it."""
    buffer = io.BytesIO()
    _to_rgb(image).save(buffer, format="JPEG", quality=95)
    return buffer.tell() / 1000


def brightness(image: Image.Image) -> float:
    """Mean luma (ITU-R 601, PIL's "L" conversion) in [0, 1]."""
    return float(np.asarray(_to_rgb(image).convert("L"), dtype=np.float32).mean() / 255)


def saturation(image: Image.Image) -> float:
    """Mean HSV saturation in [0, 1]."""
    return float(np.asarray(_to_rgb(image).convert("HSV"), dtype=np.float32)[..., 1].mean() / 255)


PIXEL_STATISTICS: dict[str, Callable[[Image.Image], float]] = {
    "brightness": brightness,
    "saturation": saturation,
    "jpeg_compressibility": lambda image: -jpeg_kilobytes(image),  # DDPO: minus the JPEG size in kB
    "jpeg_incompressibility": jpeg_kilobytes,  # DDPO: the JPEG size in kB
}


def _register_pixel_statistic(name: str) -> None:
    def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Reward:
        return PixelStatisticReward(name, PIXEL_STATISTICS[name])

    build.__qualname__ = f"build_{name}_reward"
    register_reward(name)(build)


for _name in PIXEL_STATISTICS:
    _register_pixel_statistic(_name)


def register_lazy_reward(name: str, target: str, *, flags: FlagsHook | None = None,
                         validate: ValidateHook | None = None) -> None:
    """Register a reward whose factory `module:function` is imported only when the reward is built, so this file
    never imports a module that imports it back (toyworld.reward subclasses `Reward`)."""
    module_name, _, function = target.partition(":")

    def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Reward:
        import importlib

        return getattr(importlib.import_module(module_name), function)(args, device, dtype)

    build.__qualname__ = f"lazy[{target}]"
    register_reward(name, flags=flags, validate=validate)(build)


# The toy world's programmatic reward: how well a demo image's colours, shapes and positions match its caption,
# in [0, 1]; NaN for captions outside the toy grammar. Runs on the CPU.
register_lazy_reward("toy", "toyworld.reward:make_toy_reward")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    items = load_scoring_items(args.images, args.prompts)  # before any model is loaded
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    reward = build_reward(args.reward_model, args, device=device, dtype=dtype)
    rows = score_items(reward, items, args.chunk_size)
    print(format_table(rows))
    counters = reward.counters()
    if counters:
        print("counters: " + ", ".join(f"{key}={value}" for key, value in sorted(counters.items())))
    if args.json is not None:
        write_json(args.json, reward, rows)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
