"""The SD3 family through the same core: conditioning, sampling and decoding equal StableDiffusion3Pipeline's on
the tiny SD3.5-style twin; both scripts train it through `accelerate launch` (1 and 2 processes, full and LoRA) and
their outputs load in diffusers and change its samples."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import PLUGIN, accelerate_launch, tiny_args, write_image_folder

T5_TOKENS = 32


@pytest.fixture(scope="module")
def pipe(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_sd3)


@pytest.fixture(scope="module")
def parts(tiny_sd3):
    from sharpening import sd3

    parts = sd3.load(str(tiny_sd3))
    parts.max_sequence_length = T5_TOKENS
    return parts


def test_a_resolution_past_the_positional_embedding_fails_before_loading(tiny_sd3, pipe):
    """The tiny twin's VAE halves the side and its transformer patches 1x1 with pos_embed_max_size 64: 128 px is the
    largest side it takes. The check refuses 130 from the configs, as the transformer itself would only at its first call."""
    from sharpening import families, sd3

    families.check_resolution(sd3, str(tiny_sd3), 128)
    with pytest.raises(ValueError, match=r"--resolution 130: .*covers 64 patches a side \(pos_embed_max_size\), 128 px"):
        families.check_resolution(sd3, str(tiny_sd3), 130)
    transformer = pipe.transformer
    hidden = torch.zeros(1, 4, 65, 65)
    text = torch.zeros(1, 3, transformer.config.joint_attention_dim)
    pooled = torch.zeros(1, transformer.config.pooled_projection_dim)
    with pytest.raises(ValueError, match="cannot be greater than `pos_embed_max_size`: 64"):
        transformer(hidden_states=hidden, encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.ones(1))
    with torch.no_grad():
        transformer(hidden_states=hidden[..., :64, :64], encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.ones(1))


def test_family_is_read_from_model_index(tiny_sd3, tiny_sdxl, tmp_path):
    from sharpening import families, sd3, sdxl

    assert families.family_of(str(tiny_sd3)) is sd3 and families.family_of(str(tiny_sdxl)) is sdxl
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="KandinskyPipeline checkpoint; supported: FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline"):
        families.family_of(str(tmp_path))
    # A hub id whose index cannot be fetched (offline here) is an error, not an SDXL guess that fails later elsewhere.
    with pytest.raises(ValueError, match="Could not read model_index.json of 'nobody/no-such-model' .*: there is no such local folder, and as a Hugging Face Hub id"):
        families.family_of("nobody/no-such-model")
    (tmp_path / "no-index").mkdir()
    assert families.family_of(str(tmp_path / "no-index")) is sdxl  # a local folder without an index: SDXL assumed, with a warning


def test_conditioning_equals_the_pipelines_encode_prompt(pipe, parts):
    from sharpening import sd3

    prompts = ["a red circle left of a blue square", ""]
    ours = sd3.encode_prompts(parts, prompts, None, "cpu")
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
    assert ours.prompt_embeds.shape == (2, 77 + T5_TOKENS, 96) and ours.pooled.shape == (2, 64)
    assert (ours.prompt_embeds[:, :77, 64:] == 0).all()  # the two CLIPs' 64 channels, zero-padded to T5's 96
    torch.testing.assert_close(ours.prompt_embeds, embeds, rtol=0, atol=1e-5)  # float32 matmul order
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(sd3.unconditional(parts, ours, "cpu").pooled, ours.pooled[1:].repeat(2, 1), rtol=0, atol=1e-6)


def test_guided_sampling_and_decoding_equal_the_pipeline(pipe, parts):
    from sharpening import sd3
    from sharpening.sampler import guided, sample

    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a red square", "a green triangle above a circle"]
    expected = pipe(prompts, num_inference_steps=4, guidance_scale=5.0, latents=noise.clone(), output_type="latent",
                    max_sequence_length=T5_TOKENS).images
    cond = sd3.encode_prompts(parts, prompts, None, "cpu")
    model = guided(sd3.forward(parts.denoiser), sd3.unconditional(parts, cond, "cpu"), 5.0)
    latents = sample(model, sd3.make_sampler(parts, 4), noise, cond)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)

    images, finite = sd3.decode(parts.vae, latents)
    with torch.no_grad():
        pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    reference = pipe.image_processor.postprocess(pixels, output_type="pil")
    assert finite.all()
    for ours, theirs in zip(images, reference):
        assert np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int)).max() <= 1  # rounding only


@pytest.mark.parametrize("latent_side, minimal", [(16, False), (24, True)])
def test_dynamic_shifting_scheduler_gets_the_pipelines_grid(pipe, parts, latent_side, minimal):
    """A checkpoint whose scheduler shifts by resolution (use_dynamic_shifting): the grid needs mu from the image
    sequence length, as StableDiffusion3Pipeline computes it; without it diffusers refuses to set the timesteps.
    At 16 x 16 latents the sequence is base_image_seq_len (256), where mu is base_shift whatever the slope; at 24 x 24,
    with a scheduler file that names no shift bounds (as the published SD3 ones), the pipeline reads the scheduler's
    constructor defaults (max_shift 1.15), not its own 1.16 fallback, which a raw config would have given."""
    import dataclasses

    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from sharpening import sd3
    from sharpening.sampler import guided, sample

    config = dict(parts.scheduler_config, use_dynamic_shifting=True)
    if minimal:
        config = {key: config[key] for key in ("_class_name", "num_train_timesteps", "shift", "use_dynamic_shifting")}
    dynamic = dataclasses.replace(parts, scheduler_config=config)
    shifted = StableDiffusion3Pipeline(**(pipe.components | {"scheduler": FlowMatchEulerDiscreteScheduler.from_config(config)}))
    noise = torch.randn(1, 4, latent_side, latent_side, generator=torch.Generator().manual_seed(1))
    resolution = latent_side * 2 ** (len(parts.vae.config.block_out_channels) - 1)
    expected = shifted(["a red square"], num_inference_steps=4, guidance_scale=5.0, latents=noise.clone(), height=resolution,
                       width=resolution, output_type="latent", max_sequence_length=T5_TOKENS).images
    cond = sd3.encode_prompts(dynamic, ["a red square"], None, "cpu")
    sampler = sd3.make_sampler(dynamic, 4, resolution)
    torch.testing.assert_close(sampler.sigmas.float(), shifted.scheduler.sigmas.float(), rtol=0, atol=1e-7)
    latents = sample(guided(sd3.forward(parts.denoiser), sd3.unconditional(dynamic, cond, "cpu"), 5.0), sampler, noise, cond)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="resolution"):
        sd3.make_sampler(dynamic, 4)


def test_encode_images_applies_shift_and_scale(parts):
    from sharpening import sd3

    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = sd3.encode_images(parts.vae, pixels, torch.Generator().manual_seed(2))
    with torch.no_grad():
        dist = parts.vae.encode(pixels).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(2))
    config = parts.vae.config
    assert config.shift_factor != 0 and latents.shape == (1, 4, 16, 16)
    torch.testing.assert_close(latents, (z - config.shift_factor) * config.scaling_factor, rtol=0, atol=1e-6)


def sd3_image(model_dir, lora_dir=None, base=None):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(base or model_dir)
    if lora_dir:
        pipe.load_lora_weights(lora_dir)
    if base and not lora_dir:
        pipe = StableDiffusion3Pipeline.from_pretrained(model_dir)
    return pipe("a red square", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0),
                output_type="np", max_sequence_length=T5_TOKENS).images[0]


def assert_transformer_changed(base, out) -> None:
    before = load_file(base / "transformer" / "diffusion_pytorch_model.safetensors")
    after = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert after.keys() == before.keys() and all(torch.isfinite(v).all() for v in after.values())
    assert sum(not torch.equal(after[k], before[k]) for k in before) > len(before) // 2


def sd3_args(model, out, **overrides):
    return tiny_args(model, out, max_sequence_length=T5_TOKENS, **overrides)


@pytest.mark.slow  # two launches; the default suite keeps one run per family
def test_sft_one_process_full_and_resume(tiny_sd3, tmp_path):
    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    result = accelerate_launch("train_sft_diffusion_sharpening.py", sd3_args(tiny_sd3, out, train_data_dir=data, max_train_steps=2,
                                                                              checkpointing_steps=1, use_ema=True))
    assert result.returncode == 0 and "1 processes" in result.stderr
    assert_transformer_changed(tiny_sd3, out)
    assert (out / "checkpoint-1" / "transformer" / "config.json").is_file() and (out / "checkpoint-1" / "transformer_ema").is_dir()
    assert "StableDiffusion3Pipeline" in (out / "README.md").read_text()
    assert not (sd3_image(tiny_sd3) == sd3_image(out)).all()
    # A resumed run from checkpoint-1 ends with the same weights as the uninterrupted one.
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(out / "checkpoint-1", resumed / "checkpoint-1")
    result = accelerate_launch("train_sft_diffusion_sharpening.py", sd3_args(tiny_sd3, resumed, train_data_dir=data, max_train_steps=2,
                                                                              checkpointing_steps=1, use_ema=True, resume_from_checkpoint="latest"))
    assert result.returncode == 0
    a = load_file(out / "checkpoint-2" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "checkpoint-2" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # two gloo ranks (~40 s); CI runs it with `make test-slow`
def test_sft_two_processes_lora(tiny_sd3, tmp_path):
    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    result = accelerate_launch("train_sft_diffusion_sharpening.py", sd3_args(tiny_sd3, out, train_data_dir=data, use_lora=True,
                                                                              train_batch_size=1), num_processes=2)
    assert result.returncode == 0 and "2 processes" in result.stderr
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("transformer.") for k in lora)
    assert any(".attn2." in k for k in lora)  # SD3.5's second attention is adapted too
    assert not (sd3_image(tiny_sd3) == sd3_image(tiny_sd3, lora_dir=out, base=tiny_sd3)).all()


@pytest.mark.slow
def test_rlhf_two_processes_full(tiny_sd3, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na green triangle\na yellow star\n")
    out = tmp_path / "out"
    result = accelerate_launch("train_rlhf_diffusion_sharpening.py", sd3_args(tiny_sd3, out, prompt_file=prompts, train_batch_size=1),
                               num_processes=2)
    assert result.returncode == 0 and "2 processes" in result.stderr
    assert_transformer_changed(tiny_sd3, out)
    assert not (sd3_image(tiny_sd3) == sd3_image(out)).all()


def test_rlhf_one_process_lora(tiny_sd3, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    out = tmp_path / "out"
    result = accelerate_launch("train_rlhf_diffusion_sharpening.py", sd3_args(tiny_sd3, out, prompt_file=prompts, use_lora=True))
    assert result.returncode == 0
    assert not (sd3_image(tiny_sd3) == sd3_image(tiny_sd3, lora_dir=out, base=tiny_sd3)).all()


def test_evaluate_scores_sd3_models_with_paired_seeds(tiny_sd3, tmp_path):
    import evaluate
    from peft import LoraConfig

    from sharpening import sd3

    transformer = sd3.denoiser_class().from_pretrained(tiny_sd3, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=sd3.LORA_TARGET_MODULES))  # B = 0: a no-op
    sd3.save_lora(transformer, tmp_path / "lora")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    argv = [f"--model=base={tiny_sd3}", f"--model=same={tiny_sd3},unet={tiny_sd3}", f"--model=lora={tiny_sd3},lora={tmp_path / 'lora'}",
            "--prompt_file", str(prompts), "--images_per_prompt", "2", "--steps", "3", "--guidance_scale", "3",
            "--reward_model", "brightness", "--reward_plugin", PLUGIN, "--output_dir", str(tmp_path / "eval"),
            "--device", "cpu", "--max_sequence_length", str(T5_TOKENS), "--save_images"]
    record = evaluate.main(evaluate.parse_args(argv))
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert len(saved["scores"]["base"]["brightness"]) == 4 and record["summary"]["base"]["brightness"]["prompts"] == 2
    for name in ("same", "lora"):
        assert saved["scores"][name]["brightness"] == saved["scores"]["base"]["brightness"]
        assert saved["summary"][name]["brightness"]["diff"] == 0.0

    assert_first_image_is_the_pipelines(tiny_sd3, tmp_path / "eval" / "images" / "base" / "img_00.png")


def assert_first_image_is_the_pipelines(model, saved) -> None:
    """evaluate's first image (prompt "a red square", seed 0, 3 steps, CFG 3) is StableDiffusion3Pipeline's from the
    same starting noise, to pixel rounding."""
    import evaluate
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image

    pipe = StableDiffusion3Pipeline.from_pretrained(model)
    noise = evaluate.initial_noise(1, 1, (4, 16, 16), 0)
    image = pipe("a red square", num_inference_steps=3, guidance_scale=3.0, latents=noise[0, :1], output_type="np",
                 max_sequence_length=T5_TOKENS).images[0]
    ours = np.asarray(Image.open(saved), dtype=int)
    assert np.abs(ours - np.round(image * 255).astype(int)).max() <= 1


def test_evaluate_samples_a_dynamic_shift_sd3_as_its_pipeline(tiny_sd3, tmp_path):
    """evaluate.py's bases hold no denoiser (each model loads its own), but a dynamic-shift grid needs its patch size:
    the model's own denoiser gives it, and the image is the pipeline's from the same noise."""
    import shutil

    import evaluate

    model = tmp_path / "dynamic"
    shutil.copytree(tiny_sd3, model)
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"use_dynamic_shifting": True}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    evaluate.main(evaluate.parse_args([f"--model=d={model}", "--prompt_file", str(prompts), "--images_per_prompt", "1",
                                       "--steps", "3", "--guidance_scale", "3", "--reward_model", "brightness", "--reward_plugin",
                                       PLUGIN, "--output_dir", str(tmp_path / "eval"), "--device", "cpu",
                                       "--max_sequence_length", str(T5_TOKENS), "--save_images"]))
    assert_first_image_is_the_pipelines(model, tmp_path / "eval" / "images" / "d" / "img_00.png")
