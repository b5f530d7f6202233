"""Tiny random-weight twins of the reward models, built offline in a few hundred milliseconds.

- CLIP: a tiny open_clip architecture registered under TINY_CLIP_NAME, random weights saved to a file
  (so the reward loads it the way a user's local checkpoint is loaded).
- ImageReward / IterComp: random tensors laid out exactly like the official ImageReward.pt (BLIP ViT
  `blip.visual_encoder.*`, med BERT `blip.text_encoder.*`, `mlp.layers.*`, plus the unused projections),
  a BLIP med_config.json, and a WordPiece vocab.txt for the BERT tokenizer.
The weights are scaled so scores differ clearly between inputs (otherwise order tests prove nothing).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY_CLIP_NAME = "tiny-clip-reward-twin"
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
    # the real BPE tokenizer (bundled with open_clip) emits ids up to 49407 and truncates at 77
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

# BERT layout: [PAD] = 0; BLIP then appends [DEC] and [ENC], so the text encoder has len(vocab) + 2 rows.
BERT_WORDS = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "a an the of on in with and at by is are photo painting picture cat dog horse bird car house tree sky sea "
    "red green blue yellow black white big small two three left right above below next to standing sitting "
    "under near fluffy shiny wooden metal glass city street forest mountain sunset night ##s ##ing ##ed . , !"
).split()
BLIP_VOCAB_SIZE = len(BERT_WORDS) + 2

# ViT at ImageReward's 224 px with 32 px patches (49 tokens); 128 wide = two 64-dim heads, as BLIP assumes.
TINY_VISION = {"width": 128, "depth": 2, "patch": 32, "image_size": 224, "mlp": 256}


def tiny_med_config(vocab_size: int = BLIP_VOCAB_SIZE) -> dict:
    """A BLIP med_config.json (BertConfig with cross-attention) shrunk to test size."""
    return {
        "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
        "attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1, "initializer_range": 0.02,
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "pad_token_id": 0, "type_vocab_size": 2,
        "vocab_size": vocab_size, "encoder_width": 768, "add_cross_attention": True,
    }


def write_bert_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    return folder


def image_reward_shapes(med: dict, vision: dict = TINY_VISION) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official ImageReward.pt with its shape (ImageReward = BLIP_Pretrain + MLP)."""
    w, p, n = vision["width"], vision["patch"], (vision["image_size"] // vision["patch"]) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {
        "blip.visual_encoder.cls_token": (1, 1, w),
        "blip.visual_encoder.pos_embed": (1, n, w),
        "blip.visual_encoder.patch_embed.proj.weight": (w, 3, p, p),
        "blip.visual_encoder.patch_embed.proj.bias": (w,),
        "blip.visual_encoder.norm.weight": (w,),
        "blip.visual_encoder.norm.bias": (w,),
    }
    for i in range(vision["depth"]):
        b = f"blip.visual_encoder.blocks.{i}."
        shapes.update({
            b + "norm1.weight": (w,), b + "norm1.bias": (w,),
            b + "attn.qkv.weight": (3 * w, w), b + "attn.qkv.bias": (3 * w,),
            b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
            b + "norm2.weight": (w,), b + "norm2.bias": (w,),
            b + "mlp.fc1.weight": (vision["mlp"], w), b + "mlp.fc1.bias": (vision["mlp"],),
            b + "mlp.fc2.weight": (w, vision["mlp"]), b + "mlp.fc2.bias": (w,),
        })
    h, inter = med["hidden_size"], med["intermediate_size"]
    t = "blip.text_encoder."
    shapes.update({
        t + "embeddings.position_ids": (1, med["max_position_embeddings"]),
        t + "embeddings.word_embeddings.weight": (med["vocab_size"], h),
        t + "embeddings.position_embeddings.weight": (med["max_position_embeddings"], h),
        t + "embeddings.LayerNorm.weight": (h,), t + "embeddings.LayerNorm.bias": (h,),
    })
    for i in range(med["num_hidden_layers"]):
        b = f"{t}encoder.layer.{i}."
        for block, kv_width in (("attention", h), ("crossattention", w)):
            shapes.update({
                f"{b}{block}.self.query.weight": (h, h), f"{b}{block}.self.query.bias": (h,),
                f"{b}{block}.self.key.weight": (h, kv_width), f"{b}{block}.self.key.bias": (h,),
                f"{b}{block}.self.value.weight": (h, kv_width), f"{b}{block}.self.value.bias": (h,),
                f"{b}{block}.output.dense.weight": (h, h), f"{b}{block}.output.dense.bias": (h,),
                f"{b}{block}.output.LayerNorm.weight": (h,), f"{b}{block}.output.LayerNorm.bias": (h,),
            })
        shapes.update({
            b + "intermediate.dense.weight": (inter, h), b + "intermediate.dense.bias": (inter,),
            b + "output.dense.weight": (h, inter), b + "output.dense.bias": (h,),
            b + "output.LayerNorm.weight": (h,), b + "output.LayerNorm.bias": (h,),
        })
    shapes.update({"blip.vision_proj.weight": (256, w), "blip.vision_proj.bias": (256,),
                   "blip.text_proj.weight": (256, h), "blip.text_proj.bias": (256,)})
    widths = (h, 1024, 128, 64, 16, 1)
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(widths[:-1], widths[1:])):
        shapes[f"mlp.layers.{index}.weight"] = (fan_out, fan_in)
        shapes[f"mlp.layers.{index}.bias"] = (fan_out,)
    return shapes


def expressive_init(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random values at O(1) activation scale everywhere, so scores vary a lot between inputs."""
    if name.endswith("position_ids"):
        return torch.arange(shape[-1]).expand(shape).clone()
    noise = torch.randn(shape, generator=generator)
    is_norm = "norm" in name.lower()
    if name.endswith("bias"):
        return 0.1 * noise
    if is_norm:
        return 1.0 + 0.1 * noise
    if len(shape) >= 2 and "embedding" not in name and "pos_embed" not in name and "cls_token" not in name:
        fan_in = int(np.prod(shape[1:]))
        return noise / fan_in ** 0.5
    return 0.5 * noise


def random_image_reward_state(seed: int, med: dict | None = None,
                              vision: dict = TINY_VISION) -> dict[str, torch.Tensor]:
    med = med or tiny_med_config()
    generator = torch.Generator().manual_seed(seed)
    return {name: expressive_init(name, shape, generator) for name, shape in image_reward_shapes(med, vision).items()}


def write_image_reward_twin(folder: Path, seed: int = 0) -> Path:
    """folder/ImageReward.pt + med_config.json (official layout) and folder/tokenizer/vocab.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(random_image_reward_state(seed), folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(tiny_med_config(), indent=1))
    write_bert_vocab(folder / "tokenizer")
    return folder


def write_compositional_twin(folder: Path, seeds: tuple[int, int, int] = (1, 2, 3)) -> Path:
    """IterComp's three reward models as its DDP training saves them: keys prefixed with 'module.'."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ("attribute_binding.pt", "spatial_relationship.pt", "non_spatial_relationship.pt")
    for name, seed in zip(names, seeds):
        state = {f"module.{key}": value for key, value in random_image_reward_state(seed).items()}
        torch.save(state, folder / name)
    (folder / "med_config.json").write_text(json.dumps(tiny_med_config(), indent=1))
    return folder


def write_tiny_clip(folder: Path, seed: int = 0) -> tuple[str, Path]:
    """Register the tiny open_clip architecture and save random weights; returns (model name, checkpoint)."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{TINY_CLIP_NAME}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    if TINY_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    checkpoint = folder / "tiny_clip.pt"
    torch.save(model.state_dict(), checkpoint)
    return TINY_CLIP_NAME, checkpoint


def sample_images(count: int, seed: int = 0, size: tuple[int, int] = (48, 40)) -> list[Image.Image]:
    """Distinct noisy colour images of varied modes and sizes (the preprocessing must cope)."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        base = rng.integers(0, 256, 3)
        array = np.clip(base + rng.normal(0, 60, (size[1] + 4 * (i % 3), size[0], 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
        images.append(image.convert("RGBA") if i % 4 == 3 else image)
    return images


def sample_prompts(count: int) -> list[str]:
    subjects = ["a red cat", "two blue cars", "a wooden house under a tree", "a dog next to a horse",
                "a shiny metal bird above the sea", "a green forest at sunset", "three yellow birds on a street",
                "a black and white photo of a city at night"]
    return [subjects[i % len(subjects)] + ("" if i < len(subjects) else f" number {i}") for i in range(count)]


# ------------------------------------------------------------------------- preference and aesthetic models
TINY_HPS_NAME = "tiny-hps-reward-twin"
TINY_HPS_CONFIG = {  # ViT-H-14's layout (GELU, 77-token BPE text tower), shrunk; 32 px images
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_open_clip_config(open_clip_module, folder: Path, name: str, config: dict) -> None:
    """Make `name` an architecture of an open_clip package (ours, or the copy vendored in hpsv2)."""
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    if name not in open_clip_module.list_models():
        open_clip_module.add_model_config(path)


def write_hps_twin(folder: Path, seed: int = 0) -> tuple[str, Path]:
    """A tiny open_clip model saved as HPS saves its checkpoints ({'state_dict': ...} in HPS_v2.1_compressed.pt)."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    register_open_clip_config(open_clip, folder, TINY_HPS_NAME, TINY_HPS_CONFIG)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_HPS_NAME, pretrained=None)
    torch.save({"state_dict": model.state_dict()}, folder / "HPS_v2.1_compressed.pt")
    return TINY_HPS_NAME, folder


def write_pickscore_twin(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny transformers CLIPModel and a CLIPProcessor (real CLIP BPE tokenizer, 32 px transform)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from sharpening.tiny import write_clip_tokenizer

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
                     "max_position_embeddings": 77, "vocab_size": 49408},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    model = CLIPModel(config)
    model.save_pretrained(folder / "model")
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tokenizer"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder / "processor")
    return folder / "model", folder / "processor"


AESTHETIC_WIDTHS = (1024, 128, 64, 16, 1)  # the LAION predictor's head after the CLIP embedding


def write_aesthetic_twin(folder: Path, in_features: int, seed: int = 0) -> Path:
    """Random weights laid out like sac+logos+ava1-l14-linearMSE.pth (layers.{0,2,4,6,7}), saved as DDPO names it."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    state, fan_in = {}, in_features
    for index, width in zip((0, 2, 4, 6, 7), AESTHETIC_WIDTHS):
        state[f"layers.{index}.weight"] = torch.randn(width, fan_in, generator=generator) / fan_in ** 0.5
        state[f"layers.{index}.bias"] = 0.1 * torch.randn(width, generator=generator)
        fan_in = width
    torch.save(state, folder / "aesthetic-model.pth")
    return folder
