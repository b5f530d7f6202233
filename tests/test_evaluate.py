"""evaluate.py on the tiny SDXL: paired seeds (identical models give identical images, so the paired
difference is exactly 0), every way of naming a model, and the files it writes."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import evaluate


def _run(tmp_path, models: list[str], *extra: str) -> dict:
    argv = [f"--model={m}" for m in models] + [
        "--num_prompts", "3", "--images_per_prompt", "2", "--steps", "3", "--resolution", "32",
        "--guidance_scale", "3", "--reward_model", "toy", "--output_dir", str(tmp_path / "eval"), "--device", "cpu", *extra,
    ]
    return evaluate.main(evaluate.parse_args(argv))


def _lora_folder(tiny_sdxl, folder):
    """A LoRA output like the trainers write, with freshly initialised adapters (B = 0: a no-op)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    StableDiffusionXLPipeline.save_lora_weights(str(folder), unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True)
    return folder


def test_identical_models_give_identical_images_and_zero_paired_difference(tiny_sdxl, tmp_path):
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet").save_pretrained(tmp_path / "ft" / "unet")
    lora = _lora_folder(tiny_sdxl, tmp_path / "lora")
    record = _run(tmp_path, [f"base={tiny_sdxl}", f"same={tiny_sdxl}", f"unet={tiny_sdxl},unet={tmp_path / 'ft'}", f"lora={tiny_sdxl},lora={lora}"])

    out = tmp_path / "eval"
    saved = json.loads((out / "results.json").read_text())
    assert saved["baseline"] == "base" and len(saved["prompts"]) == 3
    base_scores = saved["scores"]["base"]["toy"]
    assert len(base_scores) == 6
    for name in ("same", "unet", "lora"):
        assert saved["scores"][name]["toy"] == base_scores
        assert saved["summary"][name]["toy"]["diff"] == 0.0 and saved["summary"][name]["toy"]["diff_se"] == 0.0
    assert record["summary"]["base"]["toy"]["prompts"] == 3

    table = (out / "results.md").read_text()
    assert "| model | toy |" in table and "+0.000 ± 0.000" in table and "toy/relation" in table
    for name in ("base", "same", "unet", "lora"):
        grid = Image.open(out / f"grid_{name}.png")
        assert grid.width > 128 and grid.height > 3 * 128
    compare = Image.open(out / "compare.png")
    assert compare.width > 4 * 128


def test_a_different_model_changes_images_and_the_difference(tiny_sdxl, tmp_path):
    from diffusers import UNet2DConditionModel
    import torch

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)
    unet.save_pretrained(tmp_path / "other")
    _run(tmp_path, [f"base={tiny_sdxl}", f"other={tiny_sdxl},unet={tmp_path / 'other'}"], "--save_images")
    a = np.asarray(Image.open(tmp_path / "eval" / "images" / "base" / "img_00.png"), dtype=float)
    b = np.asarray(Image.open(tmp_path / "eval" / "images" / "other" / "img_00.png"), dtype=float)
    assert np.abs(a - b).mean() > 1.0
    # the saved images with their prompts form an imagefolder the SFT script can train on
    from datasets import load_dataset

    record = json.loads((tmp_path / "eval" / "results.json").read_text())
    folder = load_dataset("imagefolder", data_dir=str(tmp_path / "eval" / "images" / "other"), split="train")
    per_prompt = record["images_per_prompt"]
    assert folder["text"] == [p for p in record["prompts"] for _ in range(per_prompt)]
    assert np.abs(np.asarray(folder[0]["image"], dtype=float) - b).max() == 0


def test_bad_specs_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="NAME=BASE"):
        evaluate.parse_model_spec("just-a-path")
    with pytest.raises(ValueError, match="unknown option"):
        evaluate.parse_model_spec("a=base,vae=x")
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "a=base,unet=/does/not/exist"])
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "a=x", "--model", "a=y"])
    with pytest.raises(SystemExit):  # 0 used to mean "all" and -1 "all but the last"
        evaluate.parse_args(["--model", "a=x", "--num_prompts", "0"])


def test_statistics_are_over_prompts():
    scores = {"base": {"r": np.array([0.0, 1.0, 1.0, 1.0])}, "new": {"r": np.array([1.0, 1.0, 1.0, np.nan])}}
    summary = evaluate.summarise(scores, "base", per_prompt_count=2)
    assert summary["base"]["r"]["mean"] == pytest.approx(0.75)  # prompt means 0.5 and 1.0
    assert summary["base"]["r"]["se"] == pytest.approx(0.25)
    assert summary["new"]["r"]["unscored_images"] == 1
    assert summary["new"]["r"]["diff"] == pytest.approx(0.25)  # paired: (1 - 0.5) and (1 - 1)


def test_the_paired_difference_uses_only_seeds_both_models_scored():
    """3 prompts x 2 seeds; the new model is the baseline + 0.1 except one unscored image. Paired over the images
    both scored the difference is exactly +0.1; averaging each side over its own images gave 0.433 +- 0.333."""
    base = np.array([1.0, -1.0, 2.0, 0.0, 3.0, 1.0])
    new = base + 0.1
    new[1] = np.nan
    entry = evaluate.summarise({"base": {"r": base}, "new": {"r": new}}, "base", per_prompt_count=2)["new"]["r"]
    assert entry["diff"] == pytest.approx(0.1) and entry["diff_se"] == pytest.approx(0.0, abs=1e-12)
    assert entry["diff_prompts"] == 3 and entry["unscored_images"] == 1


def test_saved_image_names_sort_in_generation_order(tmp_path):
    """reward.py --prompts pairs prompts with files in sorted name order: names past 99 must not sort img_10 < img_100."""
    from sharpening.sdxl import save_images

    paths = save_images([Image.new("RGB", (1, 1))] * 101, tmp_path, "img")
    assert sorted(p.name for p in paths) == [p.name for p in paths] and paths[-1].name == "img_100.png"


def test_an_image_that_decoded_to_nan_is_scored_nan_not_black(tiny_sdxl, tmp_path, monkeypatch):
    """As in training: a non-finite decode (e.g. the stock VAE overflowing in fp16) is no score, not a black picture."""
    from sharpening import sdxl

    real_decode = sdxl.decode

    def decode_with_a_failure(vae, latents, chunk_size=8):
        images, finite = real_decode(vae, latents, chunk_size)
        finite[1] = False
        return images, finite

    monkeypatch.setattr(sdxl, "decode", decode_with_a_failure)
    record = _run(tmp_path, [f"base={tiny_sdxl}"])
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    scores = saved["scores"]["base"]["toy"]
    assert scores[1] is None and all(s is not None for i, s in enumerate(scores) if i != 1)
    assert record["summary"]["base"]["toy"]["unscored_images"] == 1


def test_vae_precision_rule_is_the_trainings():
    import torch
    from types import SimpleNamespace

    from sharpening import sdxl

    stock, fixed = SimpleNamespace(config={"force_upcast": True}), SimpleNamespace(config={"force_upcast": False})
    assert sdxl.vae_dtype(stock, torch.float16) == torch.float32
    assert sdxl.vae_dtype(fixed, torch.float16) == torch.float16
