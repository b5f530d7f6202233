"""The SDXL family against StableDiffusionXLPipeline on the tiny twin, as test_sd3.py / test_flux.py do for the flow
families: prompt encoding and the unconditional branch, micro-conditioning, guided DDIM sampling (epsilon and v),
saved LoRA adapters loaded by the pipeline, and a replacement VAE."""
from __future__ import annotations

import pytest
import torch

from sharpening import sdxl
from sharpening.sampler import guided, sample

PROMPTS = ["a red square to the left of a blue circle", "b"]


@pytest.fixture(scope="module")
def parts(tiny_sdxl):
    return sdxl.load(str(tiny_sdxl))


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)


@pytest.mark.parametrize("force_zeros", [True, False])
def test_conditioning_and_its_unconditional_branch_equal_the_pipelines(parts, pipe, force_zeros, monkeypatch, request):
    """Penultimate hidden states of both encoders, text_encoder_2's pooled projection; the negative branch zeros or
    the encoded "" as force_zeros_for_empty_prompt says; add_time_ids from odd sizes and crops."""
    monkeypatch.setattr(parts, "force_zeros_for_empty_prompt", force_zeros)
    saved = pipe.config.force_zeros_for_empty_prompt
    pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    request.addfinalizer(lambda: pipe.register_to_config(force_zeros_for_empty_prompt=saved))
    sizes, crops = [(1365, 2048), (700, 512)], [(12, 300), (0, 5)]
    cond = sdxl.encode_prompts(parts, PROMPTS, sdxl.time_ids(sizes, crops, (1024, 1024)), "cpu")
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=1e-6)
    unconditional = sdxl.unconditional(parts, cond, "cpu")
    torch.testing.assert_close(unconditional.prompt_embeds, negative, rtol=0, atol=1e-6)
    torch.testing.assert_close(unconditional.pooled, negative_pooled, rtol=0, atol=1e-6)
    assert bool((negative == 0).all()) == force_zeros
    dim = pipe.text_encoder_2.config.projection_dim
    expected = torch.cat([pipe._get_add_time_ids(size, crop, (1024, 1024), torch.float32, dim) for size, crop in zip(sizes, crops)])
    assert torch.equal(cond.time_ids, expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_guided_sampling_equals_the_pipeline_with_ddim(parts, pipe, prediction_type, monkeypatch):
    from diffusers import DDIMScheduler

    monkeypatch.setitem(parts.scheduler_config, "prediction_type", prediction_type)
    # clip_sample: the checkpoint's (Euler) scheduler config has none; ours reads that as off, DDIMScheduler as on
    pipe.scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, "prediction_type": prediction_type, "clip_sample": False})
    resolution = 32
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    cond = sdxl.encode_prompts(parts, PROMPTS, sdxl.time_ids([(resolution,) * 2] * 2, [(0, 0)] * 2, (resolution,) * 2), "cpu")
    with torch.no_grad():
        ours = sample(guided(sdxl.forward(parts.unet), sdxl.unconditional(parts, cond, "cpu"), 5.0), sdxl.make_sampler(parts, 5), noise, cond)
        expected = pipe(PROMPTS, num_inference_steps=5, guidance_scale=5.0, height=resolution, width=resolution,
                        latents=noise.clone(), output_type="latent").images
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-5)


def test_saved_lora_adapters_load_in_the_pipeline_as_trained(tiny_sdxl, tmp_path):
    """load_lora_weights only warns about keys it cannot place: the pipeline's UNet must compute what the trained
    adapted UNet computed, not merely differ from the base."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig

    unet = sdxl.load(str(tiny_sdxl)).unet
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=16, init_lora_weights="gaussian", target_modules=sdxl.LORA_TARGET_MODULES))
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    sdxl.save_lora(unet, tmp_path)
    parts = sdxl.load(str(tiny_sdxl))
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([500, 20])
    cond = sdxl.encode_prompts(parts, PROMPTS, sdxl.time_ids([(32, 32)] * 2, [(0, 0)] * 2, (32, 32)), "cpu")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(tmp_path)
    # evaluate.py's loading too: from the file's own path diffusers ignored the saved alpha (16) and took the rank (4),
    # so the adapters were scored at a quarter of their trained strength
    from types import SimpleNamespace

    import evaluate

    scored = evaluate.load_unet(evaluate.ModelSpec("lora", str(tiny_sdxl), None, str(tmp_path), None), sdxl,
                                SimpleNamespace(revision=None, variant=None), "cpu", torch.float32)
    with torch.no_grad():
        trained, base, loaded, evaluated = (sdxl.forward(model)(x, t, cond) for model in (unet, parts.unet, pipe.unet, scored))
    assert (trained - base).abs().max() > 1e-2
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-6)
    torch.testing.assert_close(evaluated, trained, rtol=0, atol=1e-5)  # fused into the weights: float rounding only


def test_a_replacement_vae_is_trained_with_and_exported(tiny_sdxl, tmp_path):
    """--pretrained_vae_model_name_or_path: the VAE that encodes and decodes in training, and the one the exported
    pipeline holds."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    replacement = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    with torch.no_grad():
        for parameter in replacement.parameters():
            parameter.add_(0.01)
    replacement.save_pretrained(tmp_path / "vae")
    parts = sdxl.load(str(tiny_sdxl), str(tmp_path / "vae"))
    expected = replacement.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in parts.vae.state_dict().items())
    sdxl.save_pipeline(parts, parts.unet, str(tiny_sdxl), tmp_path / "out", vae_path=str(tmp_path / "vae"))
    exported = StableDiffusionXLPipeline.from_pretrained(tmp_path / "out").vae.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in exported.items())
