"""End to end (slow; CI runs it): 20 steps of each script, with its default target, on the shipped toy SDXL and a
pixel reward the base does not maximise (brightness) raise that reward on the training prompts, by paired seeds.
The 2-pixel unit test (test_reward_direction.py) shows the mechanism; this shows it through the real scripts."""
from __future__ import annotations

import pytest

import evaluate
from toyworld.recipe import COMMON, MODEL, RLHF, SFT, launch, write_data

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("variant", ["sft", "rlhf"])
def test_twenty_default_steps_raise_brightness(tmp_path, variant):
    images, prompts = write_data(tmp_path / "data", images=160)
    out = tmp_path / variant
    settings = {**COMMON, **(SFT if variant == "sft" else RLHF), "reward_model": "brightness", "learning_rate": 3e-5,
                "pretrained_model_name_or_path": MODEL, "output_dir": out, "max_train_steps": 20}
    settings |= {"train_data_dir": images} if variant == "sft" else {"prompt_file": prompts}
    launch(f"train_{variant}_diffusion_sharpening_sdxl.py", settings, tmp_path / f"{variant}.log")
    record = evaluate.main(evaluate.parse_args([
        f"--model=base={MODEL}", f"--model=tuned={MODEL},unet={out}", "--reward_model", "brightness",
        "--toy_split", "train_pairs", "--num_prompts", "24", "--images_per_prompt", "2", "--steps", "10",
        "--guidance_scale", str(COMMON["guidance_scale"]), "--device", "cpu", "--output_dir", str(tmp_path / "eval"),
        "--seed", "7"]))
    diff = record["summary"]["tuned"]["brightness"]
    print(f"\n[direction] {variant}: brightness {diff['diff']:+.4f} ± {diff['diff_se']:.4f} (paired, 24 prompts x 2)")
    assert diff["diff"] > 2 * diff["diff_se"] > 0
