"""The FLUX.1 family through the same core: conditioning, packing and guidance-embedded sampling equal FluxPipeline's
on the tiny FLUX.1-dev-style twin; both scripts train it through `accelerate launch` and the outputs load in
diffusers and change its samples."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import accelerate_launch, tiny_args, write_image_folder

T5_TOKENS = 32


@pytest.fixture(scope="module")
def pipe(tiny_flux):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_flux)


@pytest.fixture(scope="module")
def parts(tiny_flux):
    from sharpening import flux

    parts = flux.load(str(tiny_flux))
    parts.max_sequence_length, parts.guidance = T5_TOKENS, 3.5
    return parts


def test_family_and_packing_match_the_pipeline(tiny_flux, pipe):
    from sharpening import families, flux

    assert families.family_of(str(tiny_flux)) is flux
    x = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    packed = flux.pack(x)
    assert torch.equal(packed, pipe._pack_latents(x, 2, 4, 6, 8))
    assert torch.equal(flux.unpack(packed, 6, 8), x)
    assert torch.equal(flux.image_ids(6, 8, "cpu", torch.float32), pipe._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))


def test_conditioning_equals_the_pipelines_encode_prompt(pipe, parts):
    from sharpening import flux

    prompts = ["a red circle left of a blue square", ""]
    ours = flux.encode_prompts(parts, prompts, None, "cpu")
    embeds, pooled, _ = pipe.encode_prompt(prompts, prompts, max_sequence_length=T5_TOKENS)
    torch.testing.assert_close(ours.prompt_embeds, embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=1e-6)
    assert ours.guidance.tolist() == [3.5, 3.5]


def test_sampling_equals_the_pipeline_with_its_dynamic_shift(pipe, parts):
    from sharpening import flux
    from sharpening.sampler import sample

    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    prompts = ["a red square", "a green triangle above a circle"]
    expected = pipe(prompts, num_inference_steps=4, guidance_scale=3.5, height=32, width=32, latents=flux.pack(noise),
                    output_type="latent", max_sequence_length=T5_TOKENS).images
    sampler = flux.make_sampler(parts, 4, 32)
    assert torch.equal(sampler.grid, pipe.scheduler.timesteps.float())  # mu from the packed sequence length (64)
    latents = sample(flux.forward(parts.denoiser), sampler, noise, flux.encode_prompts(parts, prompts, None, "cpu"))
    torch.testing.assert_close(flux.pack(latents), expected, rtol=0, atol=1e-5)


def test_true_cfg_equals_the_pipelines_true_cfg_scale(pipe, parts):
    """--true_cfg_scale: FluxPipeline's true CFG against negative_prompt "" (both passes with the embedded guidance);
    off (1) is the plain one-pass model."""
    from argparse import Namespace

    from sharpening import families, flux
    from sharpening.sampler import sample

    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    prompts = ["a red square", "a blue circle"]
    expected = pipe(prompts, negative_prompt="", true_cfg_scale=4.0, num_inference_steps=3, guidance_scale=3.5, height=32, width=32,
                    latents=flux.pack(noise), output_type="latent", max_sequence_length=T5_TOKENS).images
    cond = flux.encode_prompts(parts, prompts, None, "cpu")
    args = Namespace(guidance_scale=3.5, true_cfg_scale=4.0)
    assert families.cfg_scale(parts, args) == 4.0
    model = families.with_guidance(flux, parts, flux.forward(parts.denoiser), cond, families.cfg_scale(parts, args), "cpu")
    latents = sample(model, flux.make_sampler(parts, 3, 32), noise, cond)
    torch.testing.assert_close(flux.pack(latents), expected, rtol=0, atol=1e-5)
    plain = flux.forward(parts.denoiser)
    assert families.with_guidance(flux, parts, plain, cond, 1.0, "cpu") is plain


def test_true_cfg_scale_is_refused_for_families_without_embedded_guidance(tiny_sd3):
    from argparse import Namespace

    from sharpening import families, sd3

    parts = sd3.load(str(tiny_sd3))
    with pytest.raises(ValueError, match="--true_cfg_scale is FLUX.1's"):
        families.apply_text_settings(parts, Namespace(max_sequence_length=32, guidance_scale=5.0, true_cfg_scale=3.0))


def test_flags_left_out_take_each_familys_default(tiny_flux, tiny_sd3):
    """FLUX.1: 512 T5 tokens and embedded guidance 3.5 (FluxPipeline's defaults); SD3: 77 tokens and CFG 5. The value
    used is written back to the arguments, so model cards and trackers record it."""
    from argparse import Namespace

    from sharpening import families, flux, sd3

    for family, model, tokens, guidance in ((flux, tiny_flux, 512, 3.5), (sd3, tiny_sd3, 77, 5.0)):
        parts, args = family.load(str(model)), Namespace(max_sequence_length=None, guidance_scale=None, true_cfg_scale=1.0)
        families.apply_text_settings(parts, args)
        assert parts.max_sequence_length == args.max_sequence_length == tokens and args.guidance_scale == guidance
        assert getattr(parts, "guidance", guidance) == guidance


def test_guidance_is_refused_for_a_transformer_without_the_guidance_embedding(tiny_flux, tmp_path):
    """FLUX.1-schnell is not guidance-distilled: its transformer ignores the guidance, so --guidance_scale did nothing while
    the model card recorded it. Left out, none is recorded."""
    import json
    import shutil
    from argparse import Namespace

    from sharpening import families, flux

    schnell = tmp_path / "schnell"
    shutil.copytree(tiny_flux, schnell)
    config = json.loads((schnell / "transformer" / "config.json").read_text())
    (schnell / "transformer" / "config.json").write_text(json.dumps({**config, "guidance_embeds": False}))
    args = Namespace(pretrained_model_name_or_path=str(schnell), revision=None, prediction_type=None, loss_weighting="none",
                     weighting_scheme="none", max_sequence_length=None, guidance_scale=3.5, true_cfg_scale=1.0)
    with pytest.raises(ValueError, match="--guidance_scale 3.5: this FLUX.1 transformer has no guidance embedding"):
        families.check_family_flags(flux, args)  # from the config, before any weight loads
    parts = flux.load(str(schnell))
    with pytest.raises(ValueError, match="no guidance embedding"):
        families.apply_text_settings(parts, args)
    args.guidance_scale = None
    families.check_family_flags(flux, args)
    families.apply_text_settings(parts, args)
    assert args.guidance_scale is None and families.cfg_scale(parts, args) == 1.0


def test_the_cfg_negative_branch_keeps_the_embedded_guidance_exact_under_bf16(tiny_flux):
    """Casting the whole negative conditioning to the embeddings' bf16 rounded its guidance (3.3 -> 3.296875) while the
    positive branch kept 3.3; FluxPipeline gives both branches one value."""
    from argparse import Namespace

    from sharpening import families, flux

    parts = flux.load(str(tiny_flux))
    families.apply_text_settings(parts, Namespace(max_sequence_length=T5_TOKENS, guidance_scale=3.3, true_cfg_scale=2.0))
    cond = flux.encode_prompts(parts, ["a red square"], None, "cpu")
    cond = flux.Conditioning(cond.prompt_embeds.bfloat16(), cond.pooled.bfloat16(), cond.guidance)
    seen = []
    families.with_guidance(flux, parts, lambda x, t, c: seen.append(c.guidance) or x, cond, 2.0, "cpu")(torch.zeros(1, 4, 8, 8), torch.ones(1), cond)
    assert torch.cat(seen).tolist() == [pytest.approx(3.3)] * 2


def test_a_resolution_that_does_not_tile_into_packed_latents_fails_before_loading(tiny_flux):
    from sharpening import families, flux

    assert families.resolution_multiple(flux, str(tiny_flux)) == 4  # the twin's VAE halves the size; FLUX packs 2x2
    families.check_resolution(flux, str(tiny_flux), 32)
    with pytest.raises(ValueError, match="--resolution 34: .* needs a multiple of 4 .* use 32 or 36"):
        families.check_resolution(flux, str(tiny_flux), 34)


def flux_image(model_dir, lora_dir=None):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model_dir)
    if lora_dir:
        pipe.load_lora_weights(lora_dir)
    return pipe("a red square", num_inference_steps=2, height=32, width=32, guidance_scale=3.5, generator=torch.Generator().manual_seed(0),
                output_type="np", max_sequence_length=T5_TOKENS).images[0]


def flux_args(model, out, **overrides):
    return tiny_args(model, out, max_sequence_length=T5_TOKENS, guidance_scale=3.5, **overrides)


def test_sft_one_process_lora(tiny_flux, tmp_path):
    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    result = accelerate_launch("train_sft_diffusion_sharpening.py", flux_args(tiny_flux, out, train_data_dir=data, use_lora=True))
    assert result.returncode == 0
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("transformer.") for k in lora) and any(".ff.net." in k for k in lora)
    card = (out / "README.md").read_text()  # how to sample it as it was trained
    assert f"| T5 tokens (max_sequence_length) | {T5_TOKENS} |" in card and "| guidance scale (rollouts, validation) | 3.5 |" in card
    assert f'image = pipe("your prompt", height=32, width=32, max_sequence_length={T5_TOKENS}, guidance_scale=3.5).images[0]' in card
    assert not (flux_image(tiny_flux) == flux_image(tiny_flux, lora_dir=out)).all()


@pytest.mark.slow  # two launches; the default suite keeps one run per family
def test_rlhf_one_process_full_and_resume(tiny_flux, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    out = tmp_path / "out"
    result = accelerate_launch("train_rlhf_diffusion_sharpening.py", flux_args(tiny_flux, out, prompt_file=prompts, checkpointing_steps=1))
    assert result.returncode == 0 and "FluxPipeline" in (out / "README.md").read_text()
    before = load_file(tiny_flux / "transformer" / "diffusion_pytorch_model.safetensors")
    after = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert sum(not torch.equal(after[k], before[k]) for k in before) > len(before) // 2
    assert not (flux_image(tiny_flux) == flux_image(out)).all()
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-1", resumed / "checkpoint-1")
    result = accelerate_launch("train_rlhf_diffusion_sharpening.py", flux_args(tiny_flux, resumed, prompt_file=prompts, checkpointing_steps=1,
                                                                               resume_from_checkpoint="latest"))
    assert result.returncode == 0
    a = load_file(out / "checkpoint-2" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "checkpoint-2" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # two gloo ranks; CI runs it with `make test-slow`
def test_sft_two_processes_full(tiny_flux, tmp_path):
    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    result = accelerate_launch("train_sft_diffusion_sharpening.py", flux_args(tiny_flux, out, train_data_dir=data, train_batch_size=1),
                               num_processes=2)
    assert result.returncode == 0 and "2 processes" in result.stderr
    assert not (flux_image(tiny_flux) == flux_image(out)).all()


def test_evaluate_samples_flux_models_as_the_pipeline_does(tiny_flux, pipe, tmp_path):
    """evaluate.py on FLUX: its noise has the VAE's latent channels (the transformer's in_channels are the packed 2x2
    patches), and a model's image is FluxPipeline's from the same starting noise."""
    import json

    import numpy as np
    from PIL import Image

    import evaluate
    from sharpening import flux

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    argv = [f"--model=base={tiny_flux}", f"--model=same={tiny_flux},unet={tiny_flux}", "--prompt_file", str(prompts),
            "--images_per_prompt", "2", "--steps", "3", "--guidance_scale", "3.5", "--resolution", "32",
            "--reward_model", "toy", "--output_dir", str(tmp_path / "eval"), "--device", "cpu",
            "--max_sequence_length", str(T5_TOKENS), "--save_images"]
    record = evaluate.main(evaluate.parse_args(argv))
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert len(saved["scores"]["base"]["toy/clean"]) == 4 and record["summary"]["same"]["toy/clean"]["diff"] == 0.0

    noise = evaluate.initial_noise(2, 2, (4, 16, 16), 0)
    image = pipe("a red square", num_inference_steps=3, guidance_scale=3.5, height=32, width=32, latents=flux.pack(noise[0, :1]),
                 output_type="np", max_sequence_length=T5_TOKENS).images[0]
    ours = np.asarray(Image.open(tmp_path / "eval" / "images" / "base" / "img_00.png"), dtype=int)
    assert np.abs(ours - np.round(image * 255).astype(int)).max() <= 1
