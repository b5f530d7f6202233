"""`make demo` end to end on the tiny SDXL: data written, both trainers launched through accelerate,
five models evaluated, results where the demo says they are. (The real demo's numbers are measured by
running it; this only checks that every stage connects.)"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


# ~25 s on an idle 2-core machine (two accelerate launches, each starting two Python processes).
def test_demo_runs_end_to_end_on_the_tiny_model(tiny_sdxl, tmp_path):
    work = tmp_path / "demo"
    cmd = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--model", str(tiny_sdxl), "--work_dir", str(work),
           "--sft_steps", "1", "--rlhf_steps", "1", "--train_images", "4", "--train_batch_size", "2",
           "--eval_prompts", "2", "--images_per_prompt", "1", "--eval_steps", "2", "--threads", "1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("sft-toy", "rlhf-toy", "sft-saturation", "rlhf-saturation"):
        assert (work / name / "unet" / "config.json").is_file()
        assert f"--reward_model {name.split('-')[1]}" in (work / f"{name}.log").read_text().splitlines()[0]
    record = json.loads((work / "eval" / "results.json").read_text())
    assert list(record["models"]) == ["base", "sft-toy", "rlhf-toy", "sft-saturation", "rlhf-saturation"]
    assert "saturation" in record["summary"]["base"] and "toy/clean" in record["summary"]["base"]
    assert "| rlhf-saturation | saturation |" in (work / "eval" / "gains.md").read_text()
    assert all(p in __import__("toyworld.world", fromlist=["x"]).heldout_prompts() for p in record["prompts"])
    assert (work / "eval" / "compare.png").is_file()
    assert "| base |" in result.stdout and "[demo] results:" in result.stdout


def test_demo_flags_that_would_waste_or_silently_drop_a_run_are_refused(capsys):
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.parse_args(["--learning_rate", "3e-5"]).learning_rate == 3e-5
    # toy twice trained and overwrote sft-toy / rlhf-toy; a rate of 0 was dropped and the runs trained at the recipe's
    # evaluation options that evaluate.py refused only after the four trainings
    for argv, message in ((["--pixel_reward", "toy"], "trains on the toy reward already"), (["--learning_rate", "0"], "must be > 0"),
                          (["--eval_prompts", "113"], "--eval_prompts must be between 1 and 112 (the heldout prompts)"),
                          (["--eval_split", "train_pairs", "--eval_prompts", "321"], "between 1 and 320 (the train_pairs prompts)"),
                          (["--eval_prompts", "0"], "--eval_prompts must be between 1 and 112"),
                          (["--images_per_prompt", "0"], "--images_per_prompt must be between 1 and 1009")):
        with pytest.raises(SystemExit):
            demo.parse_args(argv)
        assert message in capsys.readouterr().err
    # a ',' in --model broke evaluate.py's model specs after the four trainings (about 10 minutes in)
    with pytest.raises(SystemExit, match="a ',' in a path"):
        demo.parse_args(["--model", "/tmp/a,b/toy-sdxl"])
