"""Tiny SDXL-, SD3- and FLUX-architecture models built offline, for tests, benchmarks and the CPU demo.

Sizes follow diffusers' own SDXL pipeline tests. The tokenizers are real CLIP BPE tokenizers written from
the vocabulary file that open_clip ships, so prompts are tokenized exactly as SDXL's would be (49408 tokens,
77-token context) without any hub download.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch

CLIP_VOCAB_SIZE = 49408
CLIP_CONTEXT = 77
# OpenAI CLIP's BPE table: 48894 merges after the version header (49408 - 256 bytes * 2 - 2 specials).
_NUM_MERGES = CLIP_VOCAB_SIZE - 256 * 2 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_clip_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Write vocab.json + merges.txt of OpenAI CLIP's tokenizer (from open_clip's bundled BPE file) and save
    a `CLIPTokenizer` there with `save_pretrained`. Returns the folder."""
    import open_clip
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"), model_max_length=CLIP_CONTEXT)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_sdxl(out_dir: str | os.PathLike, seed: int = 0, sample_size: int = 32) -> Path:
    """Save a randomly initialised tiny SDXL (diffusers layout, loadable by path with
    `StableDiffusionXLPipeline.from_pretrained`). VAE downsamples by 2, so `--resolution 32` gives 16x16 latents."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + pooled text_encoder_2 width 32
        cross_attention_dim=64,  # text_encoder (32) + text_encoder_2 (32) hidden sizes, concatenated
        norm_num_groups=1,
    )
    # SDXL ships an Euler scheduler config; our trainers build DDIM from it, as they must on the real model.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type="epsilon",
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=sample_size * 2,
        norm_num_groups=32,
    )
    text_config = CLIPTextConfig(
        bos_token_id=CLIP_VOCAB_SIZE - 2,
        eos_token_id=CLIP_VOCAB_SIZE - 1,
        pad_token_id=CLIP_VOCAB_SIZE - 1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_CONTEXT,
        hidden_act="gelu",
        projection_dim=32,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    return save_sdxl(out, unet, vae, text_encoder, text_encoder_2, scheduler)


def save_sdxl(out: Path, unet, vae, text_encoder, text_encoder_2, scheduler) -> Path:
    """Save the parts as a StableDiffusionXLPipeline with OpenAI CLIP's BPE tokenizer for both encoders."""
    import shutil

    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    tok_dir = write_clip_tokenizer(out / "_tokenizer_build")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(tok_dir)
    return out


# ------------------------------------------------------------------------------------------ tiny SD3
T5_CONTEXT = 32


def write_t5_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 256, corpus: tuple[str, ...] = (),
                       model_max_length: int = T5_CONTEXT) -> Path:
    """A small SentencePiece-style Unigram tokenizer (trained here, offline, on letters, digits, punctuation, a few
    phrases and `corpus`), saved as a `T5Tokenizer`: pad 0, </s> 1, <unk> 2, as T5's. It tokenizes any text, so
    prompts reach the T5 encoder as they would on the real model, only split into smaller pieces (mostly letters)."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5Tokenizer

    alphabet = list(string.ascii_lowercase + string.digits + string.punctuation)
    corpus = alphabet + ["a photo of a red circle left of a blue square", "the quick brown fox jumps over the lazy dog", *corpus]
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(corpus, trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", initial_alphabet=alphabet))
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", tokenizer.token_to_id("</s>"))])
    out = Path(out_dir)
    T5Tokenizer(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                model_max_length=model_max_length).save_pretrained(out)
    return out


def _tiny_clip_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=CLIP_VOCAB_SIZE - 2, eos_token_id=CLIP_VOCAB_SIZE - 1, pad_token_id=CLIP_VOCAB_SIZE - 1,
        hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=3,
        vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_CONTEXT, hidden_act="gelu", projection_dim=32,
    )


def _tiny_flow_vae(shift_factor: float, scaling_factor: float, seed: int):
    """A VAE that downsamples by 2 with SD3/FLUX's latent convention ((z - shift) * scale, no quant convs)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32,
        shift_factor=shift_factor, scaling_factor=scaling_factor, use_quant_conv=False, use_post_quant_conv=False,
    )


def tokenizers_and_t5(build: Path, width: int, seed: int, corpus: tuple[str, ...] = (), t5_max_length: int = T5_CONTEXT):
    """(CLIP tokenizer, T5 tokenizer, a tiny T5 encoder of `width`) for the flow twins and the toy flow model, written
    offline under `build` (`corpus`, `t5_max_length`: see write_t5_tokenizer)."""
    from transformers import AutoTokenizer, CLIPTokenizer, T5Config, T5EncoderModel

    clip_tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(build / "clip"))
    t5_tokenizer = AutoTokenizer.from_pretrained(write_t5_tokenizer(build / "t5", corpus=corpus, model_max_length=t5_max_length))
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=width, d_kv=width // 4, d_ff=2 * width, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return clip_tokenizer, t5_tokenizer, t5


def build_tiny_sd3(out_dir: str | os.PathLike, seed: int = 0, sample_size: int = 16) -> Path:
    """Save a randomly initialised tiny SD3.5-style model (diffusers layout, loadable with
    `StableDiffusion3Pipeline.from_pretrained`): an MMDiT with one dual-attention block and RMS qk-norm, two CLIP text
    encoders with projection, a real (tiny) T5 encoder and a VAE with shift and scale factors. The VAE downsamples
    by 2, so `--resolution 32` gives 16x16 latents. T5 (96 wide) is wider than the two CLIP widths combined (64), as
    in SD3 (4096 against 2048), so the CLIP embeddings are zero-padded to its width; a narrower T5 would make SD3
    truncate them."""
    import shutil

    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    out = Path(out_dir)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=64, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    vae = _tiny_flow_vae(0.0609, 1.5305, seed + 1)  # SD3's factors
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(_tiny_clip_config())
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config())
    build = out / "_tokenizer_build"
    tokenizer, tokenizer_3, text_encoder_3 = tokenizers_and_t5(build, 96, seed + 4)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(build)
    return out


def build_tiny_flux(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Save a randomly initialised tiny FLUX.1-dev-style model (diffusers layout, loadable with
    `FluxPipeline.from_pretrained`): double- and single-stream blocks with a guidance embedding, CLIP (pooled) and a
    real tiny T5, a VAE with shift and scale factors, FLUX.1-dev's dynamic-shift scheduler. The VAE downsamples by 2,
    so `--resolution 32` gives 16x16 latents (8x8 packed patches)."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    out = Path(out_dir)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                         guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    vae = _tiny_flow_vae(0.1159, 0.3611, seed + 1)  # FLUX's factors
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_clip_config())
    build = out / "_tokenizer_build"
    tokenizer, tokenizer_2, text_encoder_2 = tokenizers_and_t5(build, 32, seed + 3)
    return save_flux(out, build, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2)


def save_flux(out: Path, build: Path, transformer, vae, clip, clip_tokenizer, t5, t5_tokenizer) -> Path:
    """Save the parts as a FluxPipeline with FLUX.1-dev's dynamic-shift scheduler; removes the tokenizer `build` folder."""
    import shutil

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
                 text_encoder_2=t5, tokenizer_2=t5_tokenizer).save_pretrained(out, safe_serialization=True)
    shutil.rmtree(build)
    return out


# ------------------------------------------------------------------------------------------ real-size SDXL
# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json, vae/config.json, scheduler/scheduler_config.json,
# text_encoder(_2)/config.json (only what differs from the library defaults that matters for the cost).
SDXL_UNET_CONFIG = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-5, norm_num_groups=32,
    out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
SDXL_VAE_CONFIG = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    force_upcast=True, in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3,
    sample_size=1024, scaling_factor=0.13025, up_block_types=["UpDecoderBlock2D"] * 4,
)
SDXL_SCHEDULER_CONFIG = dict(
    _class_name="EulerDiscreteScheduler", beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
    clip_sample=False, interpolation_type="linear", num_train_timesteps=1000, prediction_type="epsilon",
    sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, timestep_spacing="leading",
    trained_betas=None, use_karras_sigmas=False,
)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280, hidden_act="gelu")


def build_sdxl_size(out_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Save an SDXL with every part at its real size (SDXL-base-1.0's configs: 2816-dim add embeddings, CLIP-L and
    OpenCLIP-bigG text encoders of real width) and random weights, in diffusers layout, in `dtype` (about 7 GB in
    bf16). Catches config wiring that the tiny model hides; it is not a model of anything."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out_dir)
    common = dict(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_CONTEXT, bos_token_id=49406,
                  eos_token_id=49407, pad_token_id=49407)
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)  # build directly in `dtype`: the fp32 UNet alone would take 10 GB
    try:
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, **common))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT, **common))
    finally:
        torch.set_default_dtype(previous)
    scheduler = EulerDiscreteScheduler.from_config({k: v for k, v in SDXL_SCHEDULER_CONFIG.items() if k != "_class_name"})
    return save_sdxl(out, unet, vae, text_encoder, text_encoder_2, scheduler)


# ------------------------------------------------------------------------------------------ real-size SD3.5 / FLUX.1
# stabilityai/stable-diffusion-3.5-medium and black-forest-labs/FLUX.1-dev: transformer/config.json, vae/config.json,
# scheduler/scheduler_config.json; text_encoder_3 (SD3) / text_encoder_2 (FLUX) is T5 v1.1 XXL's encoder.
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
FLOW_VAE = dict(  # the 16-channel VAE of SD3 and FLUX (they differ only in shift and scale)
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3,
    latent_channels=16, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=1024,
    up_block_types=["UpDecoderBlock2D"] * 4, use_quant_conv=False, use_post_quant_conv=False,
)
T5_XXL_ENCODER = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)


def build_flow_size(out_dir: str | os.PathLike, family: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                    device: str = "cpu") -> Path:
    """Save SD3.5-medium (`family` "sd3", about 16 GB in bf16) or FLUX.1-dev ("flux", about 33 GB) with every part at
    its real size and random weights, in diffusers layout (`device` "cuda" initialises the weights in seconds).
    The tokenizers are the offline ones of the tiny twins (the T5 one is small, so prompts use only the first ids of
    T5-XXL's vocabulary). Catches memory and wiring that the tiny twins hide; it is not a model of anything."""
    import shutil

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    if family not in ("sd3", "flux"):
        raise ValueError(f"family must be 'sd3' or 'flux', not {family!r}")
    out = Path(out_dir)
    build = out / "_tokenizer_build"
    clip_tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(build / "clip"))
    t5_tokenizer = AutoTokenizer.from_pretrained(write_t5_tokenizer(build / "t5", model_max_length=512))
    common = dict(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_CONTEXT, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            t5 = T5EncoderModel(T5Config(**T5_XXL_ENCODER))
            if family == "sd3":
                transformer = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)
                vae = AutoencoderKL(**FLOW_VAE, shift_factor=0.0609, scaling_factor=1.5305)
                clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L_TEXT, **common))
                clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT, **common))
            else:
                transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
                vae = AutoencoderKL(**FLOW_VAE, shift_factor=0.1159, scaling_factor=0.3611)
                clip_l = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, **common))
    finally:
        torch.set_default_dtype(previous)
    if family == "sd3":
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), vae=vae,
            text_encoder=clip_l, tokenizer=clip_tokenizer, text_encoder_2=clip_g, tokenizer_2=clip_tokenizer,
            text_encoder_3=t5, tokenizer_3=t5_tokenizer)
        pipe.save_pretrained(out, safe_serialization=True)
        shutil.rmtree(build)
        return out
    return save_flux(out, build, transformer, vae, clip_l, clip_tokenizer, t5, t5_tokenizer)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny (or real-size) random SDXL in diffusers layout.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sdxl_size", action="store_true", help="Every part at SDXL's real size, in bf16 (about 7 GB).")
    parser.add_argument("--sd3", action="store_true", help="A tiny SD3.5-style model instead of SDXL.")
    parser.add_argument("--flux", action="store_true", help="A tiny FLUX.1-dev-style model instead of SDXL.")
    parser.add_argument("--flow_size", choices=("sd3", "flux"), help="SD3.5-medium or FLUX.1-dev at real size, in bf16 (16 / 33 GB).")
    parser.add_argument("--device", default="cpu", help="Where --flow_size initialises its weights (cuda: seconds).")
    a = parser.parse_args()
    if a.flow_size:
        print(build_flow_size(a.out_dir, a.flow_size, seed=a.seed, device=a.device))
    elif a.sd3 or a.flux:
        print((build_tiny_sd3 if a.sd3 else build_tiny_flux)(a.out_dir, a.seed))
    else:
        print(build_sdxl_size(a.out_dir, seed=a.seed) if a.sdxl_size else build_tiny_sdxl(a.out_dir, a.seed))
