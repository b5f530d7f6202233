"""The real-size flow preset of scripts/gpu_checks.sh: its configs are SD3.5-medium's and FLUX.1-dev's (parameter
counts of the published checkpoints, counted on the meta device: nothing is allocated), and the builder writes
pipelines that our families and diffusers load (checked with the configs shrunk, so it runs in seconds)."""
from __future__ import annotations

import pytest
import torch


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_real_size_configs_have_the_published_parameter_counts():
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel

    from sharpening.tiny import FLOW_VAE, FLUX_DEV_TRANSFORMER, SD35_MEDIUM_TRANSFORMER, T5_XXL_ENCODER

    with torch.device("meta"):
        sd35 = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)
        flux = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
        t5 = T5EncoderModel(T5Config(**T5_XXL_ENCODER))
        vae = AutoencoderKL(**FLOW_VAE)
    # SD3.5-medium: 2.47 B weights in its checkpoint, of which the 384x384x1536 positional table (226.5 M) is a
    # buffer here, not a parameter
    assert _count(sd35) + sd35.pos_embed.pos_embed.numel() == 2_243_171_520 + 384 * 384 * 1536
    assert _count(flux) == 11_901_408_320  # FLUX.1-dev's 11.9 B
    assert _count(t5) == 4_762_310_656  # T5 v1.1 XXL's encoder
    assert 83e6 < _count(vae) < 84.5e6 and vae.config.latent_channels == 16


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_size_builder_writes_loadable_pipelines(family, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from sharpening import families, tiny

    small_clip = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32, hidden_act="gelu")
    monkeypatch.setattr(tiny, "CLIP_L_TEXT", small_clip)
    monkeypatch.setattr(tiny, "CLIP_BIGG_TEXT", small_clip)
    monkeypatch.setattr(tiny, "T5_XXL_ENCODER", {**tiny.T5_XXL_ENCODER, "vocab_size": 300, "d_model": 64, "d_kv": 16, "d_ff": 64,
                                                 "num_layers": 1, "num_heads": 4})
    monkeypatch.setattr(tiny, "FLOW_VAE", {**tiny.FLOW_VAE, "block_out_channels": [32, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
                                           "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "latent_channels": 4 if family == "sd3" else 16})
    monkeypatch.setattr(tiny, "SD35_MEDIUM_TRANSFORMER", {**tiny.SD35_MEDIUM_TRANSFORMER, "num_layers": 2, "attention_head_dim": 8,
                                                          "num_attention_heads": 4, "joint_attention_dim": 64, "caption_projection_dim": 32,
                                                          "pooled_projection_dim": 64, "pos_embed_max_size": 16, "in_channels": 4,
                                                          "out_channels": 4, "dual_attention_layers": (0,)})
    monkeypatch.setattr(tiny, "FLUX_DEV_TRANSFORMER", {**tiny.FLUX_DEV_TRANSFORMER, "num_layers": 1, "num_single_layers": 1,
                                                       "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 64,
                                                       "pooled_projection_dim": 32, "axes_dims_rope": (4, 4, 8)})
    out = tiny.build_flow_size(tmp_path / family, family, dtype=torch.bfloat16)
    family_module = families.family_of(str(out))
    assert family_module.__name__ == f"sharpening.{family}"
    parts = family_module.load(str(out))
    stored = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert stored["proj_out.weight"].dtype == torch.bfloat16  # built in bf16 (SD3's positional table stays fp32, as in diffusers)
    vae_shift = {"sd3": 0.0609, "flux": 0.1159}[family]
    assert parts.vae.config.shift_factor == pytest.approx(vae_shift)
    cond = family_module.encode_prompts(parts, ["a red circle"], None, "cpu")
    assert torch.isfinite(cond.prompt_embeds.float()).all()
    with pytest.raises(ValueError, match="family must be"):
        tiny.build_flow_size(tmp_path / "x", "sdxl")
