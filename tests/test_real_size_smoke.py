"""Real-size wiring on the CPU (slow; `make test-slow`, run by CI): SDXL with every part at its real size and
random weights (2816-dim add embeddings, CLIP-L + bigG text encoders of real width), one LoRA step of each script in
bf16 at 64 px through `accelerate launch`. The tiny model cannot catch a wrong width here; this can. Prints each
step's peak host memory."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, accelerate_launch, tiny_args, write_image_folder

# pytest.ini's 900 s covers fixture and test together; the build (1200 s) and launch (1800 s) limits below are the real ones.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]


@pytest.fixture(scope="module")
def sdxl_size(tmp_path_factory):
    """Built in its own process, so this one does not hold ~7 GB while a training run takes ~16 GB; its ~6.5 GB on
    disk are removed when the module ends, whatever the outcome."""
    out = tmp_path_factory.mktemp("sdxl-size")
    try:
        subprocess.run([sys.executable, "-m", "sharpening.tiny", str(out), "--sdxl_size"], cwd=ROOT, check=True, timeout=1200)
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.mark.parametrize("script", ["train_sft_diffusion_sharpening_sdxl.py", "train_rlhf_diffusion_sharpening_sdxl.py"])
def test_one_lora_step_of_real_size_sdxl_in_bf16(sdxl_size, tmp_path, script):
    from safetensors.torch import load_file

    data = write_image_folder(tmp_path / "data", count=2, size=64)
    out = tmp_path / "out"
    argv = tiny_args(sdxl_size, out, train_data_dir=data, resolution=64, train_batch_size=1, max_train_steps=1,
                     num_noisy_latents=2, trajectory_nums=1, infer_steps=4, use_lora=True, mixed_precision="bf16",
                     learning_rate=1e-4)
    result = accelerate_launch(script, argv, timeout=1800)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "outcome=updated" in result.stderr or "outcome=updated" in result.stdout
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(v.float().abs().sum() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)
    peak = re.search(r"Peak memory of this process: host RSS ([\d.]+) GiB", result.stderr)
    assert peak, result.stderr[-3000:]
    print(f"\n[real-size] {script}: one LoRA step in bf16 at 64 px, peak host RSS {peak[1]} GiB")
