"""`make demo` end to end on the tiny SDXL: data written, both trainers launched through accelerate,
three models evaluated, results where the demo says they are. (The real demo's numbers are measured by
running it; this only checks that every stage connects.)"""
from __future__ import annotations

import json
import subprocess
import sys

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
