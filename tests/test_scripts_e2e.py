"""The real scripts as users run them: `accelerate launch`, 1 and 2 processes (gloo), full and LoRA;
outputs load into a diffusers pipeline; SIGTERM leaves a checkpoint a run resumes from; no secret leaks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import ROOT, accelerate_launch, launch_command, tiny_args, write_image_folder

SECRET = "sk-test-NEVER-LOG-THIS-0123456789"


def assert_unet_changed(tiny_sdxl: Path, out: Path) -> None:
    base = load_file(tiny_sdxl / "unet" / "diffusion_pytorch_model.safetensors")
    trained = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert trained.keys() == base.keys()
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert sum(not torch.equal(trained[k], base[k]) for k in base) > len(base) // 2


def pipeline_image(tiny_sdxl: Path, unet_dir: Path | None = None, lora_dir: Path | None = None):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    extra = {"unet": UNet2DConditionModel.from_pretrained(unet_dir)} if unet_dir else {}
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, **extra)
    if lora_dir:
        pipe.load_lora_weights(lora_dir)
    generator = torch.Generator().manual_seed(0)
    return pipe("a red square", num_inference_steps=2, height=32, width=32, generator=generator, output_type="np").images[0]


def run_model_card_code(out: Path):
    """The card's Python block as a user pastes it: it loads the output and samples one image, without deprecation
    warnings (diffusers 0.42 deprecates `torch_dtype` for `dtype`)."""
    import warnings

    code = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    code = code.replace('pipe("your prompt",', 'pipe("a red square", num_inference_steps=2,')  # 2 steps: a tiny model
    scope: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, str(out / "README.md"), "exec"), scope)
    assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning)) and "torch_dtype" in str(w.message)]
    return scope["image"]


def assert_no_secret(out: Path, result: subprocess.CompletedProcess) -> None:
    assert SECRET not in result.stdout and SECRET not in result.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_sft_one_process_full_unet(tiny_sdxl, tmp_path):
    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    argv = tiny_args(
        tiny_sdxl, out, train_data_dir=data, max_train_steps=3, checkpointing_steps=1, checkpoints_total_limit=2,
        validation_prompt="a red square", num_validation_images=2, report_to="tensorboard",
        reward_model="graded_brightness", grader_token=SECRET,
        center_crop=True, random_flip=True, proportion_empty_prompts=0.2, use_ema=True, gradient_checkpointing=True,
    )
    result = accelerate_launch("train_sft_diffusion_sharpening_sdxl.py", argv)
    assert result.returncode == 0
    assert "1 processes" in result.stderr
    assert_unet_changed(tiny_sdxl, out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not list(out.glob(".tmp-checkpoint-*"))
    card = (out / "README.md").read_text()
    assert "| candidates per prompt (n) | 3 |" in card and "`graded_brightness`" in card
    assert list((out / "logs").rglob("events.out.tfevents*"))
    assert len(list((out / "validation").glob("*.png"))) >= 2
    image = pipeline_image(tiny_sdxl, unet_dir=out / "unet")
    assert image.shape == (32, 32, 3) and image.std() > 0
    assert run_model_card_code(out).size == (32, 32)
    assert_no_secret(out, result)


def test_sft_two_processes_lora(tiny_sdxl, tmp_path):
    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    argv = tiny_args(tiny_sdxl, out, train_data_dir=data, max_train_steps=2, use_lora=True, lora_rank=4, train_batch_size=1,
                     report_to="tensorboard")
    result = accelerate_launch("train_sft_diffusion_sharpening_sdxl.py", argv, num_processes=2)
    assert result.returncode == 0
    assert "2 processes" in result.stderr  # really two ranks, not one process with --cpu
    # logged metrics cover both ranks: one trained prompt each (brightness never ties), not rank 0's one
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert [e.value for e in events.Scalars("trained_prompts")] == [2.0, 2.0]
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("unet.") for k in lora)
    # LoRA B matrices start at zero (gaussian init); after training at least one has moved.
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)
    base, tuned = pipeline_image(tiny_sdxl), pipeline_image(tiny_sdxl, lora_dir=out)
    assert not (base == tuned).all()


def test_rlhf_two_processes_full_unet(tiny_sdxl, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["a red square", "a blue circle", "", "a green triangle"]) + "\n")
    out = tmp_path / "out"
    argv = tiny_args(tiny_sdxl, out, prompt_file=prompts, max_train_steps=2, train_batch_size=1, beta_dpo=500.0, reward_margin_scale=1.0)
    result = accelerate_launch("train_rlhf_diffusion_sharpening_sdxl.py", argv, num_processes=2)
    assert result.returncode == 0
    assert "2 processes" in result.stderr
    assert "blank or missing skipped: 1" in result.stderr
    assert_unet_changed(tiny_sdxl, out)
    assert pipeline_image(tiny_sdxl, unet_dir=out / "unet").std() > 0


def test_rlhf_one_process_lora_from_dataset_captions(tiny_sdxl, tmp_path):
    data = write_image_folder(tmp_path / "data", count=4)
    out = tmp_path / "out"
    argv = tiny_args(tiny_sdxl, out, train_data_dir=data, max_train_steps=2, use_lora=True,
                     reward_model="graded_brightness", grader_token=SECRET)
    result = accelerate_launch("train_rlhf_diffusion_sharpening_sdxl.py", argv)
    assert result.returncode == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert not (pipeline_image(tiny_sdxl) == pipeline_image(tiny_sdxl, lora_dir=out)).all()
    assert_no_secret(out, result)


def sigterm_after_first_update(cmd: list[str], env: dict, log: Path, group: bool = False) -> tuple[int, str]:
    """Start a training command, send SIGTERM once it has made an update (to its whole process group, as SLURM does,
    with `group`), and return (exit status, its output)."""
    with open(log, "w") as stream:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=group)
        deadline = time.time() + 300
        while "outcome=updated" not in log.read_text() and time.time() < deadline and process.poll() is None:
            time.sleep(0.5)
        if group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=300)
    return returncode, log.read_text()


def test_sigterm_checkpoints_exits_143_and_resumes(tiny_sdxl, tmp_path):
    """SIGTERM to the whole process group, data-loader workers included (SLURM, torch's elastic launcher): a worker
    killed by it used to crash the main process mid-step, with no checkpoint."""
    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    argv = tiny_args(tiny_sdxl, out, train_data_dir=data, max_train_steps=500, checkpointing_steps=1000, dataloader_num_workers=2)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    returncode, text = sigterm_after_first_update([sys.executable, str(ROOT / "train_sft_diffusion_sharpening_sdxl.py"), *argv],
                                                  env, tmp_path / "log.txt", group=True)
    assert returncode == 143, text[-3000:]
    assert json.loads((out / "PREEMPTED.json").read_text())["exit_code"] == 143
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 1, text[-3000:]
    step = json.loads((checkpoints[0] / "training_state.json").read_text())["global_step"]
    assert 1 <= step < 500 and (checkpoints[0] / "unet" / "config.json").is_file()

    resumed = subprocess.run(
        [sys.executable, str(ROOT / "train_sft_diffusion_sharpening_sdxl.py"),
         *tiny_args(tiny_sdxl, out, train_data_dir=data, max_train_steps=step + 1, resume_from_checkpoint="latest")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stderr
    assert (out / "unet").is_dir()


def test_sigterm_under_two_processes_leaves_a_marker_and_resumes(tiny_sdxl, tmp_path):
    """`accelerate launch` with 2 (gloo) ranks forwards SIGTERM to both; each finishes its update, the checkpoint is
    written, and OUTPUT_DIR/PREEMPTED.json says so, because the launcher reports the workers' 143 as a plain 1."""
    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    argv = tiny_args(tiny_sdxl, out, train_data_dir=data, max_train_steps=500, checkpointing_steps=1000, train_batch_size=1)
    returncode, text = sigterm_after_first_update(*launch_command("train_sft_diffusion_sharpening_sdxl.py", argv, num_processes=2),
                                                  tmp_path / "log.txt")
    assert "2 processes" in text, text[-3000:]
    assert returncode != 0, text[-3000:]  # 1 from the launcher (143 from a single process)
    marker = json.loads((out / "PREEMPTED.json").read_text())
    step = marker["global_step"]
    assert marker["exit_code"] == 143 and (out / marker["checkpoint"] / "unet" / "config.json").is_file(), text[-3000:]
    assert 1 <= step < 500

    resumed = accelerate_launch("train_sft_diffusion_sharpening_sdxl.py",
                                tiny_args(tiny_sdxl, out, train_data_dir=data, max_train_steps=step + 1, train_batch_size=1,
                                          resume_from_checkpoint="latest"), num_processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stderr
    assert not (out / "PREEMPTED.json").exists()  # the resumed run took over and finished
