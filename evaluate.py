#!/usr/bin/env python
"""Evaluate SDXL, SD3/SD3.5 and FLUX.1 models on a prompt set with paired seeds: JSON, a Markdown table and image grids.

    # base vs fine-tunes of the toy model on the toy world's held-out prompts (the default prompt set)
    python evaluate.py --model base=models/toy-sdxl \\
        --model sft=models/toy-sdxl,unet=runs/sft/unet --model rlhf=models/toy-sdxl,lora=runs/rlhf \\
        --reward_model toy --output_dir eval/

    # one model the short way; real SDXL on a GPU with your prompts and rewards
    python evaluate.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --lora runs/rlhf --prompt_file prompts.txt --reward_model "clip,image_reward" \\
        --device cuda --dtype fp16 --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix --resolution 1024

Model spec: `NAME=BASE[,unet=PATH][,lora=PATH][,pred=epsilon|v_prediction]`. BASE is an SDXL, SD3/SD3.5 or FLUX.1 checkpoint
(the family is read from its model_index.json). `unet` is the trained denoiser: a diffusers UNet (SD3, FLUX: transformer)
folder, or a training output or checkpoint folder holding `unet/` (SD3, FLUX: `transformer/`); `lora` is a LoRA output or
checkpoint folder, or a `.safetensors` file. `pred` (SDXL only) is the prediction type the model was trained for
(training's --prediction_type); without it, the type a final training output records is used (a full fine-tune's
`scheduler/` config, a LoRA's model card), else the base's. Checkpoint folders record none: give `pred=` for a
checkpoint trained with --prediction_type. `--models_json` takes the same as
{"NAME": {"base": ..., "unet": ..., "lora": ..., "pred": ...}}.

Pairing: image k of prompt i starts from the same noise (seeded by `--seed` x 1000003 + i x 1009 + k, drawn on the
CPU) for every model, so differences between models are differences of the models, and the paired difference against
the baseline removes the prompt and seed variance. Standard errors are over PROMPTS (the images of one
prompt are averaged first: they are not independent samples of the prompt distribution).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from reward import add_reward_args  # noqa: E402

# The noise of image k of prompt i is seeded by seed x 1000003 + i x MAX_IMAGES_PER_PROMPT + k: up to that many images
# per prompt, no two images share a seed.
MAX_IMAGES_PER_PROMPT = 1009

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ModelSpec:
    name: str
    base: str
    unet: str | None = None
    lora: str | None = None
    pred: str | None = None  # the prediction type given with pred=; resolve_models fills prediction_type
    prediction_type: str | None = None  # what it is sampled with (None: a flow-matching family, which has no choice)

    def describe(self) -> str:
        return self.base + (f" + unet {self.unet}" if self.unet else "") + (f" + lora {self.lora}" if self.lora else "")


PREDICTION_TYPES = ("epsilon", "v_prediction")
MODEL_SPEC = "NAME=BASE[,unet=PATH][,lora=PATH][,pred=epsilon|v_prediction]"


def parse_model_spec(text: str) -> ModelSpec:
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--model {text!r}: expected {MODEL_SPEC}.")
    base, *options = rest.split(",")
    fields = {}
    for option in options:
        key, sep, value = option.partition("=")
        if key not in ("unet", "lora", "pred") or not sep or not value:
            raise ValueError(f"--model {text!r}: unknown option {option!r} (use unet=PATH, lora=PATH or pred=TYPE).")
        fields[key] = value
    spec = ModelSpec(name, base, **fields)
    check_pred(spec)
    return spec


def check_pred(spec: ModelSpec) -> None:
    if spec.pred is not None and spec.pred not in PREDICTION_TYPES:
        raise ValueError(f"--model {spec.name}: pred={spec.pred!r}; use one of {', '.join(PREDICTION_TYPES)}.")


def file_stem(name: str) -> str:
    """A model name as a file name (grid_STEM.png): names may hold '/' (benchmarks name models `reward/variant@step`)."""
    return re.sub(r"[^A-Za-z0-9_.@=-]+", "_", name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from sharpening.config import check_output_folder
    from sharpening.data import PROMPT_FILE_HELP

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--model", action="append", default=[], metavar=MODEL_SPEC,
                   help="Repeat to compare models. pred= (SDXL only): the prediction type the model was trained for "
                        "(training's --prediction_type); default: what the unet/lora folder records, else the base's.")
    g.add_argument("--models_json", default=None, help='{"NAME": {"base": ..., "unet": ..., "lora": ..., "pred": ...}, ...}')
    g.add_argument("--pretrained_model_name_or_path", default=None, help="One model the short way (with --unet / --lora / --prediction_type).")
    g.add_argument("--unet", default=None)
    g.add_argument("--lora", default=None)
    g.add_argument("--prediction_type", default=None, choices=PREDICTION_TYPES, help="The short way's pred= (see --model).")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None, help="A replacement VAE (e.g. the fp16-fix) for every model.")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None)
    g.add_argument("--baseline", default=None, help="Model name the paired differences are taken against (default: the first).")

    g = p.add_argument_group("prompts")
    g.add_argument("--prompt_file", default=None, help=PROMPT_FILE_HELP + " Default: the toy world's held-out prompts.")
    g.add_argument("--caption_column", default=None, help="The --prompt_file field (.jsonl) or column (.csv/.tsv) of the prompts.")
    g.add_argument("--toy_split", default="heldout", choices=["heldout", "train", "train_pairs", "single"], help="Toy prompt set when no --prompt_file.")
    g.add_argument("--num_prompts", type=int, default=None, help="Use the first N prompts.")
    g.add_argument("--images_per_prompt", type=int, default=2)
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=25, help="Sampling steps (DDIM for SDXL, flow-matching Euler for SD3 and FLUX).")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="SD3 and FLUX.1: T5 tokens per prompt, as in training (default: 77 for SD3, 512 for FLUX.1).")
    g.add_argument("--guidance_scale", type=float, default=None, help="CFG scale, default 5 (FLUX.1: the embedded guidance, default 3.5).")
    g.add_argument("--true_cfg_scale", type=float, default=1.0, help="FLUX.1 only: true CFG against the empty prompt (1 = off), as in training.")
    g.add_argument("--resolution", type=int, default=None, help="Default: the denoiser's sample size times the VAE's downsampling (FLUX.1: FluxPipeline's 1024 px); "
                        "models on bases made for different sizes need it.")
    g.add_argument("--batch_size", type=int, default=16, help="Images per sampling batch.")
    g.add_argument("--decode_batch_size", type=int, default=None, help="VAE decodes per chunk (default: 8 at 512 px, 2 at 1024 px).")
    g.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    g.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="UNet and text encoders; the VAE stays fp32 when its config says force_upcast (the stock SDXL VAE).")

    g = p.add_argument_group("rewards and outputs")
    add_reward_args(p, argv)
    p.set_defaults(reward_model="toy")
    g.add_argument("--also_score", action="append", default=[], metavar="REWARD",
                   help="Another reward to score the same images with, reported beside --reward_model (e.g. guard metrics "
                        "that show reward hacking); repeatable.")
    g.add_argument("--output_dir", default="evaluation")
    g.add_argument("--grid_prompts", type=int, default=8, help="Prompts shown in the image grids (0: no grids).")
    g.add_argument("--save_images", action="store_true",
                   help="Also save every image as PNG, under OUTPUT_DIR/images/MODEL/ with a metadata.jsonl of their prompts "
                        "(an imagefolder: --train_data_dir of the SFT script). Images that decoded to non-finite pixels "
                        "are saved but left out of metadata.jsonl. Model names must then be plain folder names (no '/').")
    args = p.parse_args(argv)

    try:
        from reward import check_reward_flags_used

        check_reward_flags_used(args, [args.reward_model, *args.also_score])
        models = [parse_model_spec(m) for m in args.model]
        if args.models_json:
            models += models_from_json(Path(args.models_json))
    except (ValueError, OSError) as error:
        p.error(str(error))
    if args.pretrained_model_name_or_path:
        models.append(ModelSpec("model", args.pretrained_model_name_or_path, args.unet, args.lora, args.prediction_type))
    elif args.unet or args.lora or args.prediction_type:
        p.error("--unet / --lora / --prediction_type need --pretrained_model_name_or_path (or use --model NAME=BASE,unet=PATH).")
    if not models:
        p.error(f"give at least one model: --model {MODEL_SPEC} or --pretrained_model_name_or_path.")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        p.error(f"model names must be unique, got {names}.")
    stems: dict[str, str] = {}
    for name in names:
        # --save_images makes a folder of each name: 'a/b' would nest inside 'a' (and be read as a's training data).
        if args.save_images and ("/" in name or "\\" in name or name in (".", "..")):
            p.error(f"--save_images: model name {name!r} is not a plain folder name (images/{name}/); rename it without '/' or '\\'.")
        stem = file_stem(name)
        if stem in stems:
            p.error(f"model names {stems[stem]!r} and {name!r} both make the file name grid_{stem}.png; rename one.")
        stems[stem] = name
    args.models = models
    args.baseline = args.baseline or names[0]
    if args.baseline not in names:
        p.error(f"--baseline {args.baseline!r} is not one of the models {names}.")
    if args.prompt_file and args.toy_split != "heldout":
        p.error(f"--toy_split {args.toy_split} chooses toy-world prompts, and --prompt_file replaces them: give one of the two.")
    if args.caption_column and not args.prompt_file:
        p.error("--caption_column names the --prompt_file field of the prompts; add --prompt_file, or drop it.")
    if args.steps < 1:
        p.error("--steps must be >= 1.")
    if not 1 <= args.images_per_prompt <= MAX_IMAGES_PER_PROMPT:  # prompt i + 1's noise seeds start where prompt i's end
        p.error(f"--images_per_prompt must be between 1 and {MAX_IMAGES_PER_PROMPT}.")
    if args.num_prompts is not None and args.num_prompts < 1:
        p.error("--num_prompts must be >= 1 (leave it out to use every prompt).")
    if args.grid_prompts < 0:
        p.error("--grid_prompts must be >= 0 (0: no grids).")
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1.")
    if args.decode_batch_size is not None and args.decode_batch_size < 1:
        p.error("--decode_batch_size must be >= 1 (leave it out for the default).")
    for m in models:
        for label, path in (("unet", m.unet), ("lora", m.lora)):
            if path and not Path(path).exists():
                p.error(f"--model {m.name}: {label} path {path!r} does not exist.")
    try:
        check_output_folder(args.output_dir)
    except ValueError as error:
        p.error(str(error))
    return args


# --------------------------------------------------------------------------------------------- prompts
def load_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt_file:
        from sharpening.data import read_prompt_file

        prompts, stats = read_prompt_file(args.prompt_file, args.caption_column)
        print(f"[evaluate] {args.prompt_file}: {stats['prompts']} prompts (blank or missing skipped: {stats['blank_skipped']}, "
              f"duplicates kept: {stats['duplicates']})", flush=True)
    else:
        from toyworld import world

        print(f"[evaluate] no --prompt_file: the toy world's {args.toy_split} prompts (scored by --reward_model "
              f"{args.reward_model}); give --prompt_file for a real model", flush=True)
        prompts = {
            "heldout": world.heldout_prompts,
            "train": world.train_prompts,
            "train_pairs": world.train_pair_prompts,  # shuffled: --num_prompts N takes a spread of pairs
            "single": world.single_prompts,
        }[args.toy_split]()
    if args.num_prompts is not None and args.num_prompts > len(prompts):
        source = f"--prompt_file {args.prompt_file}" if args.prompt_file else f"the toy world's {args.toy_split} split"
        raise ValueError(f"--num_prompts {args.num_prompts}: {source} has only {len(prompts)} prompts.")
    return prompts[: args.num_prompts] if args.num_prompts is not None else prompts


def check_toy_prompts(prompts: list[str], reward_specs: list[str]) -> None:
    """The toy reward scores only captions in the toy world's grammar (NaN otherwise): with a real prompt set every
    image would be generated and the table would be all n/a. Checked before any model is loaded."""
    from reward import parse_reward_spec
    from toyworld import world

    users = [spec for spec in reward_specs if any(name == "toy" for name, _ in parse_reward_spec(spec))]
    if not users or not prompts:
        return
    outside = sum(world.parse_caption(prompt) is None for prompt in prompts)
    if outside == len(prompts):
        raise ValueError(f"None of the {len(prompts)} prompts is a toy-world caption, so the toy reward ({', '.join(users)}) "
                         "cannot score any image: choose a reward for real prompts with --reward_model (e.g. clip), "
                         "and leave toy out of --also_score.")
    if outside:
        print(f"[evaluate] warning: {outside} of {len(prompts)} prompts are not toy-world captions; the toy reward scores "
              "their images NaN (left out of the statistics)", flush=True)


# --------------------------------------------------------------------------------------------- prediction types
def recorded_prediction_type(path: str) -> tuple[str | None, str | None]:
    """(prediction type, where it was read) that a training output records, or (None, None). A full fine-tune's
    pipeline folder holds scheduler/scheduler_config.json with the trained type (save_pipeline); a LoRA output's model
    card (README.md) names it when training overrode the base's with --prediction_type. `path` may be the output
    folder, its denoiser folder (DIR/unet) or a LoRA .safetensors file; checkpoint folders record nothing."""
    path = Path(path)
    folders = [path.parent] if path.is_file() else [path, path.parent] if (path / "config.json").is_file() else [path]
    for folder in folders:
        config = folder / "scheduler" / "scheduler_config.json"
        if config.is_file():
            found = json.loads(config.read_text()).get("prediction_type")
            if found:  # flow-matching schedulers (SD3, FLUX) have no prediction type
                return found, str(config)
        card = folder / "README.md"
        if card.is_file() and (match := re.search(r'prediction_type="(\w+)"', card.read_text())):
            return match[1], str(card)
    return None, None


def resolve_models(args) -> None:
    """What needs only configs, before anything is loaded (a bad flag must not cost the models evaluated before it):
    each model's prediction_type, pred= or else what its unet/lora folder records or else its base's (the base's
    scheduler config alone would sample a model trained with --prediction_type v_prediction on an epsilon base as
    epsilon). Only SDXL has that choice; SD3 and FLUX are flow matching (velocity)."""
    from sharpening.families import check_resolution, check_true_cfg, family_of, native_resolution, scheduler_prediction_type

    native = {}
    for spec in args.models:
        family = family_of(spec.base, args.revision)
        if spec.unet:
            denoiser_folder(spec, family.DENOISER)
        if spec.lora:
            lora_weights(spec)
        check_true_cfg(family.PIPELINE_CLASS == "FluxPipeline", args.true_cfg_scale, f"--model {spec.name} ({family.PIPELINE_CLASS})")
        if args.resolution is not None:
            check_resolution(family, spec.base, args.resolution, args.revision)
        else:
            native[spec.name] = native_resolution(family, spec.base, args.revision)
        recorded = [recorded_prediction_type(path) for path in (spec.unet, spec.lora) if path]
        recorded = [(found, where) for found, where in recorded if found]
        if family.PIPELINE_CLASS != "StableDiffusionXLPipeline":
            if spec.pred:
                raise ValueError(f"--model {spec.name}: pred= chooses SDXL's epsilon or v prediction; {spec.base} is a "
                                 f"{family.PIPELINE_CLASS} (flow matching, always the velocity): drop pred=.")
            continue
        base_type = scheduler_prediction_type(spec.base, args.revision)
        spec.prediction_type = spec.pred or (recorded[0][0] if recorded else base_type)
        for found, where in recorded:
            if found != base_type or found != spec.prediction_type:
                print(f"[evaluate] warning: {spec.name}: {where} says {found}, its base {spec.base} says {base_type}; sampling "
                      f"as {spec.prediction_type}" + (" (pred=)" if spec.pred else " (give pred= to choose)"), flush=True)
    if args.resolution is None:
        # Every model is sampled from the same initial noise, so at one size: each base's own when they agree.
        if len(set(native.values())) > 1:
            raise ValueError(f"The models' bases are made for different resolutions ({', '.join(f'{k}: {v} px' for k, v in native.items())}); "
                             "paired seeds need one: give --resolution.")
        args.resolution = next(iter(native.values()))


# --------------------------------------------------------------------------------------------- models
def denoiser_folder(spec: ModelSpec, name: str) -> Path:
    """unet=PATH: a full fine-tune's output (PATH/unet or PATH/transformer) or that folder itself."""
    path = Path(spec.unet)
    folder = path / name if (path / name / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--model {spec.name}: unet={spec.unet} holds no {name}/config.json nor config.json: give a "
                                f"full fine-tune's output or its checkpoint-N folder (a LoRA's output goes in lora=).")
    return folder


def lora_weights(spec: ModelSpec) -> Path:
    path = Path(spec.lora)
    weights = path if path.is_file() else path / "pytorch_lora_weights.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"--model {spec.name}: no LoRA weights at {weights}.")
    return weights


def models_from_json(path: Path) -> list[ModelSpec]:
    """--models_json: {"NAME": {"base": ..., "unet": ..., "lora": ..., "pred": ...}, ...}."""
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--models_json {path}: no such file.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--models_json {path}: not valid JSON ({err.msg}, line {err.lineno}).") from None
    if not isinstance(document, dict):
        raise ValueError(f"--models_json {path}: expected an object of NAME: {{\"base\": ...}}, got {type(document).__name__}.")
    models = []
    for name, spec in document.items():
        unknown = set(spec) - {"base", "unet", "lora", "pred"} if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or "base" not in spec or unknown:
            raise ValueError(f"--models_json {path}: model {name!r} needs an object with \"base\" and optionally \"unet\", \"lora\", "
                             f"\"pred\" (got {json.dumps(spec)[:80]}).")
        models.append(ModelSpec(name, spec["base"], spec.get("unet"), spec.get("lora"), spec.get("pred")))
        check_pred(models[-1])
    return models


def load_unet(spec: ModelSpec, family, args, device, dtype):
    """The base denoiser (SDXL's UNet, SD3's transformer), with a full fine-tune's weights or LoRA adapters applied."""
    cls, name = family.denoiser_class(), family.DENOISER
    if spec.unet:
        unet = cls.from_pretrained(denoiser_folder(spec, name))
    else:
        unet = cls.from_pretrained(spec.base, subfolder=name, revision=args.revision, variant=args.variant)
    unet = _move(unet, device, dtype)
    if spec.lora:
        weights = lora_weights(spec)
        # Folder plus weight_name: only then does diffusers read the file as safetensors with its adapter metadata
        # (rank AND alpha); from the file's own path it infers alpha = rank, which mis-scales a LoRA trained with
        # --lora_alpha other than the rank (r 4, alpha 16 was sampled at a quarter of its trained strength).
        unet.load_lora_adapter(str(weights.parent), weight_name=weights.name, prefix=name, adapter_name="evaluated")
        check_lora_applied(spec, weights, unet, name)
        unet.fuse_lora()  # inference cost of the base model, as after merging
    return unet.eval().requires_grad_(False)


def check_lora_applied(spec: ModelSpec, weights: Path, denoiser, name: str) -> None:
    """Every adapted layer of the file found its module. diffusers only warns when no key matches the prefix ("safe
    to ignore"), and the model would then be scored as its base."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as handle:
        keys = list(handle.keys())
    # the adapted layers the file names: "unet.<module>.lora_A.weight" (peft) or "unet.<module>.lora.down.weight" (diffusers)
    wanted = {key.split(".lora", 1)[0] for key in keys if key.startswith(f"{name}.") and ".lora" in key}
    found = sum(1 for _, module in denoiser.named_modules() if "evaluated" in getattr(module, "lora_A", {}))
    if not wanted or found < len(wanted):
        prefixes = sorted({key.split(".")[0] for key in keys})
        raise ValueError(f"--model {spec.name}: the LoRA {weights} adapts {found} of {len(wanted)} layers of {spec.base}'s {name} "
                         f"(its keys start with {prefixes}): a LoRA of another model family or base?")


def _move(module, device, dtype):
    """Cast only when needed (diffusers warns on every dtype cast, even a no-op one)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module


class BaseParts:
    """Tokenizers, text encoders and VAE of a base checkpoint, loaded once for every model on that base."""

    def __init__(self, base: str, args, device, dtype):
        from sharpening.families import apply_text_settings, family_of

        self.family = family = family_of(base, args.revision)
        parts = family.load(base, args.pretrained_vae_model_name_or_path, args.revision, args.variant)
        parts.denoiser = None  # each model loads its own
        # Each base resolves the text flags on its own copy: apply_text_settings writes a family's defaults into what it
        # is given (SD3: 77 T5 tokens and CFG 5, FLUX.1: 512 and guidance 3.5), and in the shared args the first base's
        # defaults would become the flags of every later base.
        self.settings = argparse.Namespace(guidance_scale=args.guidance_scale, max_sequence_length=args.max_sequence_length,
                                           true_cfg_scale=args.true_cfg_scale)
        apply_text_settings(parts, self.settings)
        for encoder in parts.text_encoders:
            _move(encoder.requires_grad_(False), device, dtype)
        _move(parts.vae.requires_grad_(False), device, family.vae_dtype(parts.vae, dtype))
        self.parts = parts
        self.scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)

    def sampling_settings(self) -> dict:
        """This base's text settings for results.json: guidance_scale is the CFG scale, except for FLUX.1, where it is
        the embedded guidance and true_cfg_scale the CFG; max_sequence_length is SD3's and FLUX.1's T5 tokens."""
        settings = {"guidance_scale": self.settings.guidance_scale, "max_sequence_length": getattr(self.parts, "max_sequence_length", None)}
        if hasattr(self.parts, "guidance"):
            settings["true_cfg_scale"] = self.settings.true_cfg_scale
        return settings


# --------------------------------------------------------------------------------------------- generation
def initial_noise(num_prompts: int, images_per_prompt: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(P, K, C, H, W): image k of prompt i starts from noise seeded by (seed, i, k), the same for every
    model; drawn on the CPU so it is also the same on every device."""
    out = torch.empty(num_prompts, images_per_prompt, *shape)
    for i in range(num_prompts):
        for k in range(images_per_prompt):
            out[i, k] = torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i * MAX_IMAGES_PER_PROMPT + k))
    return out


@torch.no_grad()
def generate(spec: ModelSpec, base: BaseParts, prompts: list[str], noise: torch.Tensor, args, device, dtype) -> tuple[list, np.ndarray]:
    """Images (prompt-major: prompt i, image k at i * K + k) for one model, and whether each decoded to finite
    pixels (an image that did not is scored NaN, as in training, not as the black picture it becomes)."""
    from sharpening.families import cfg_scale, with_guidance
    from sharpening.sampler import sample

    family = base.family
    unet = load_unet(spec, family, args, device, dtype)
    # The base's parts hold no denoiser (each model loads its own); the sampler may need its config (SD3's dynamic shift).
    # A shallow copy, with the attribute set (SDXLParts names its field `unet`, with `denoiser` as a property).
    parts = copy.copy(base.parts)
    parts.denoiser = unet
    if spec.prediction_type is not None:  # SDXL: the type this model was trained for, which may not be its base's
        parts.scheduler_config = {**parts.scheduler_config, "prediction_type": spec.prediction_type}
    sampler = family.make_sampler(parts, args.steps, args.resolution)
    num_prompts, per_prompt = noise.shape[:2]
    flat_prompts = [p for p in prompts for _ in range(per_prompt)]
    flat_noise = noise.flatten(0, 1)
    r = args.resolution
    images, finite = [], []
    for start in range(0, len(flat_prompts), args.batch_size):
        batch = flat_prompts[start : start + args.batch_size]
        ids = family.time_ids([(r, r)] * len(batch), [(0, 0)] * len(batch), (r, r))
        cond = family.encode_prompts(base.parts, batch, ids, device).to(dtype=dtype)
        model = with_guidance(family, base.parts, family.forward(unet), cond, cfg_scale(base.parts, base.settings), device)
        latents = sample(model, sampler, flat_noise[start : start + len(batch)].to(device, dtype), cond)
        batch_images, batch_finite = family.decode(base.parts.vae, latents, args.decode_batch_size)
        images += batch_images
        finite.append(batch_finite.numpy())
    del unet
    return images, np.concatenate(finite)


# --------------------------------------------------------------------------------------------- statistics
def mean_se(values: np.ndarray) -> tuple[float, float, int]:
    """Mean and standard error of the finite values (NaN SE for fewer than 2)."""
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se, len(v)


def per_prompt(scores: np.ndarray, per_prompt_count: int) -> np.ndarray:
    """(P*K,) image scores -> (P,) prompt means over the finite images (NaN where none)."""
    grid = scores.reshape(-1, per_prompt_count)
    with np.errstate(invalid="ignore"), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore", RuntimeWarning)
        return np.nanmean(grid, axis=1)


def scored_by_all(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """The (P*K,) score arrays with NaN wherever ANY of them is NaN: a paired comparison uses only the images every
    compared model scored, so an unscored image does not bring back the seed-to-seed variance that pairing removes."""
    scored = np.logical_and.reduce([np.isfinite(a) for a in arrays])
    return [np.where(scored, a, np.nan) for a in arrays]


def summarise(scores: dict[str, dict[str, np.ndarray]], baseline: str, per_prompt_count: int) -> dict:
    """scores[model][metric] = (P*K,) -> {model: {metric: {mean, se, prompts, unscored_images, [diff, diff_se,
    diff_prompts]}}}: statistics over prompt means; diff is paired with the baseline on the same prompts and seeds."""
    summary = {}
    for model, metrics in scores.items():
        summary[model] = {}
        for metric, values in metrics.items():
            prompt_means = per_prompt(values, per_prompt_count)
            mean, se, n = mean_se(prompt_means)
            entry = {"mean": mean, "se": se, "prompts": n, "unscored_images": int((~np.isfinite(values)).sum())}
            if model != baseline and metric in scores[baseline]:
                ours, reference = scored_by_all([values, scores[baseline][metric]])
                diff, diff_se, paired_prompts = mean_se(per_prompt(ours, per_prompt_count) - per_prompt(reference, per_prompt_count))
                entry |= {"diff": diff, "diff_se": diff_se, "diff_prompts": paired_prompts}
            summary[model][metric] = entry
    return summary


def format_estimate(mean: float, se: float, signed: bool = False) -> str:
    """mean ± SE with the SE to two significant figures (at least 3 decimals), the mean to as many: at 3 fixed
    decimals an SE of 0.00048 printed as "± 0.000", and a reader could not tell 10 SE from 1."""
    if not math.isfinite(mean):
        return "n/a"
    decimals = max(3, 1 - math.floor(math.log10(se))) if math.isfinite(se) and se > 0 else 3
    text = f"{mean:+.{decimals}f}" if signed else f"{mean:.{decimals}f}"
    return text + (f" ± {se:.{decimals}f}" if math.isfinite(se) else "")


def markdown_table(summary: dict, baseline: str, total: str) -> str:
    """One row per model: every metric as mean ± SE, then the paired difference of the total vs the baseline."""
    metrics = list(next(iter(summary.values())))
    header = ["model", *metrics, f"Δ {total} vs {baseline} (paired)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, row in summary.items():
        diff = "—" if model == baseline else format_estimate(row[total].get("diff", float("nan")), row[total].get("diff_se", float("nan")), signed=True)
        lines.append("| " + " | ".join([model, *(format_estimate(row[m]["mean"], row[m]["se"]) for m in metrics), diff]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- grids
def _upscale(image, min_side: int = 128):
    from PIL import Image

    factor = max(1, math.ceil(min_side / image.width))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST) if factor > 1 else image


def image_grid(rows: list[list], row_labels: list[str], col_labels: list[str]):
    """A labelled grid of PIL images (small images are upscaled so they can be seen)."""
    from PIL import Image, ImageDraw

    cells = [[_upscale(i) for i in row] for row in rows]
    w, h = cells[0][0].size
    # Column labels wrapped to the column's width, never cut: the benchmarks' names share long prefixes
    # ("jpeg_compressibility/sft@60"), and cut to the width they could not be told apart.
    headers = ["\n".join(textwrap.wrap(text, max(1, w // 6), break_on_hyphens=False)) for text in col_labels]
    label_w, label_h = 260, 4 + 12 * max(text.count("\n") + 1 for text in headers)
    grid = Image.new("RGB", (label_w + w * len(cells[0]), label_h + h * len(cells)), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(headers):
        draw.text((label_w + c * w + 2, 2), text, fill="black")
    for r, row in enumerate(cells):
        draw.text((2, label_h + r * h + 2), _wrap(row_labels[r], 42), fill="black")
        for c, image in enumerate(row):
            grid.paste(image, (label_w + c * w, label_h + r * h))
    return grid


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


def write_grids(out: Path, images: dict[str, list], prompts: list[str], per_prompt_count: int, limit: int) -> list[Path]:
    shown = range(min(limit, len(prompts)))
    if not shown:  # --grid_prompts 0
        return []
    paths = []
    for name, imgs in images.items():  # one grid per model: prompts x seeds
        grid = image_grid([[imgs[i * per_prompt_count + k] for k in range(per_prompt_count)] for i in shown],
                          [prompts[i] for i in shown], [f"seed {k}" for k in range(per_prompt_count)])
        paths.append(out / f"grid_{file_stem(name)}.png")
        grid.save(paths[-1])
    names = list(images)  # side by side: prompts x models, first seed (the before/after view)
    grid = image_grid([[images[n][i * per_prompt_count] for n in names] for i in shown], [prompts[i] for i in shown], names)
    paths.append(out / "compare.png")
    grid.save(paths[-1])
    return paths


def guidance_note(models: dict) -> str:
    """The guidance of results.md's note: one value when every model shares it, else each model's."""
    def text(m: dict) -> str:
        if "true_cfg_scale" in m:  # FLUX.1
            return f"guidance {m['guidance_scale']} (embedded), true CFG {m['true_cfg_scale']}"
        return f"CFG {m['guidance_scale']}"

    texts = {name: text(m) for name, m in models.items()}
    if len(set(texts.values())) == 1:
        return next(iter(texts.values()))
    return ", ".join(f"{name}: {t}" for name, t in texts.items())


# --------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict:
    from reward import build_reward, parse_reward_spec
    from rewards.base import checked_evaluate

    started = time.time()
    # --reward_plugin files were imported by add_reward_args, before parsing: their rewards are registered.
    for spec in [args.reward_model, *args.also_score]:
        parse_reward_spec(spec)  # a bad spec fails before any model is loaded
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    prompts = load_prompts(args)
    check_toy_prompts(prompts, [args.reward_model, *args.also_score])
    resolve_models(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rewards = {spec: build_reward(spec, args, device=device) for spec in dict.fromkeys([args.reward_model, *args.also_score])}

    bases: dict[str, BaseParts] = {}
    images, scores, seconds = {}, {}, {}
    noise = None
    for spec in args.models:
        t0 = time.time()
        if spec.base not in bases:
            bases[spec.base] = BaseParts(spec.base, args, device, dtype)
        base = bases[spec.base]
        family = base.family
        # The VAE's latent channels, not the denoiser's in_channels: FLUX's transformer takes packed 2x2 patches (4x wider).
        channels = int(base.parts.vae.config.latent_channels)
        shape = (channels, args.resolution // base.scale, args.resolution // base.scale)
        if noise is None:
            noise = initial_noise(len(prompts), args.images_per_prompt, shape, args.seed)
        elif tuple(noise.shape[2:]) != shape:
            raise ValueError(f"--model {spec.name}: latent shape {shape} differs from the first model's {tuple(noise.shape[2:])}; paired seeds need the same shape.")
        images[spec.name], finite = generate(spec, base, prompts, noise, args, device, dtype)
        if not finite.all():
            print(f"[evaluate] {spec.name}: {int((~finite).sum())} image(s) decoded to non-finite pixels; scored NaN", flush=True)
        flat_prompts = [p for p in prompts for _ in range(args.images_per_prompt)]
        metrics = {}
        for reward_spec, reward in rewards.items():
            result = checked_evaluate(reward, images[spec.name], flat_prompts)
            metrics[reward_spec] = np.where(finite, result.total.float().cpu().numpy(), np.nan)
            for name, values in result.components.items():
                metrics.setdefault(name, np.where(finite, values.float().cpu().numpy(), np.nan))
        scores[spec.name] = metrics
        seconds[spec.name] = round(time.time() - t0, 1)
        # the mean over prompts of each prompt's mean, as the table says (a plain image mean weighs a prompt by its scored images)
        mean = mean_se(per_prompt(metrics[args.reward_model], args.images_per_prompt))[0]
        print(f"[evaluate] {spec.name}: {args.reward_model} = {mean:.4f} ({seconds[spec.name]} s)", flush=True)
        if args.save_images:
            from sharpening.sdxl import save_images
            from toyworld.world import write_captions

            folder = out / "images" / spec.name
            paths = save_images(images[spec.name], folder, "img")
            # Each image's prompt beside it makes the folder an imagefolder: a model's own samples as training data.
            # An image that decoded to non-finite pixels is kept on disk (names stay in generation order) but is no
            # sample of the model, so it is left out of metadata.jsonl (imagefolder loads only the listed files).
            listed = [(path.name, prompt) for path, prompt, ok in zip(paths, flat_prompts, finite, strict=True) if ok]
            write_captions(folder, [name for name, _ in listed], [prompt for _, prompt in listed])
            if len(listed) < len(paths):
                print(f"[evaluate] {spec.name}: {len(paths) - len(listed)} non-finite image(s) left out of "
                      f"{folder / 'metadata.jsonl'}", flush=True)

    sampler = " / ".join(dict.fromkeys(base.family.SAMPLER for base in bases.values()))
    summary = summarise(scores, args.baseline, args.images_per_prompt)
    table = markdown_table(summary, args.baseline, args.reward_model)
    record = {
        # Each model with its base's text settings: one run may hold several families, each with its own defaults.
        "models": {m.name: {"base": m.base, "unet": m.unet, "lora": m.lora, "prediction_type": m.prediction_type,
                            **bases[m.base].sampling_settings()} for m in args.models},
        "baseline": args.baseline,
        "reward_model": args.reward_model,
        "prompts": prompts,
        "images_per_prompt": args.images_per_prompt,
        "seeds": "image k of prompt i: torch.Generator().manual_seed(seed * 1000003 + i * 1009 + k) on the CPU",
        "seed": args.seed,
        "sampling": {"sampler": sampler, "steps": args.steps, "resolution": args.resolution, "device": str(device), "dtype": args.dtype},
        "summary": summary,
        "scores": {m: {k: [None if not math.isfinite(x) else float(x) for x in v] for k, v in metrics.items()} for m, metrics in scores.items()},
        "seconds": seconds | {"total": round(time.time() - started, 1)},
        "reward_counters": {k: v for reward in rewards.values() for k, v in reward.counters().items()},
    }
    (out / "results.json").write_text(json.dumps(record, indent=2))
    note = (f"{len(prompts)} prompts x {args.images_per_prompt} images, {sampler} {args.steps} steps, {guidance_note(record['models'])}; "
            f"mean ± standard error over prompts; Δ = paired difference vs {args.baseline} (same seeds).")
    (out / "results.md").write_text(f"{table}\n\n{note}\n")
    # The grids last: the scores are written whatever happens to them.
    grids = write_grids(out, images, prompts, args.images_per_prompt, args.grid_prompts)
    print(table + "\n\n" + note + f"\n[evaluate] wrote {out / 'results.json'}, {out / 'results.md'}, " + ", ".join(str(g) for g in grids), flush=True)
    return record


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
