"""diffusers' output and checkpoint contract for both scripts (in-process on the tiny SDXL).

The checkpoint semantics are those of diffusers' own example tests (examples/text_to_image/test_text_to_image.py):
which `checkpoint-N` folders exist after a run, after a resume, and under --checkpoints_total_limit; and what a
checkpoint and the output folder hold (a loadable `unet/`, `unet_ema/` with EMA, a complete pipeline at the end)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import reset_accelerate_state, tiny_args, write_image_folder

import train_rlhf_diffusion_sharpening_sdxl as rlhf
import train_sft_diffusion_sharpening_sdxl as sft


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(params=["sft", "rlhf"])
def run(request, tiny_sdxl, tmp_path):
    """run(out, **flags): one in-process run of the SFT or the RLHF script on the tiny SDXL."""
    data = write_image_folder(tmp_path / "data", count=4)
    script = {"sft": sft, "rlhf": rlhf}[request.param]

    def go(out: Path, **flags):
        try:
            script.main(script.parse_args(tiny_args(tiny_sdxl, out, **{"train_data_dir": data, "train_batch_size": 1, **flags})))
        finally:
            reset_accelerate_state()

    return go


def checkpoints(out: Path) -> set[int]:
    return {int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")}


def test_checkpoints_are_kept_resumed_and_pruned_as_in_diffusers(run, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "out"
    run(out, max_train_steps=5, checkpointing_steps=2)
    assert checkpoints(out) == {2, 4}
    UNet2DConditionModel.from_pretrained(out, subfolder="checkpoint-2/unet")  # every checkpoint holds a loadable UNet

    shutil.rmtree(out / "checkpoint-2")
    run(out, max_train_steps=7, checkpointing_steps=2, resume_from_checkpoint="checkpoint-4")
    assert checkpoints(out) == {4, 6}

    limited = tmp_path / "limited"
    run(limited, max_train_steps=7, checkpointing_steps=2, checkpoints_total_limit=2)
    assert checkpoints(limited) == {4, 6}

    several = tmp_path / "several"
    run(several, max_train_steps=9, checkpointing_steps=2)
    assert checkpoints(several) == {2, 4, 6, 8}
    run(several, max_train_steps=11, checkpointing_steps=2, resume_from_checkpoint="checkpoint-8", checkpoints_total_limit=3)
    assert checkpoints(several) == {6, 8, 10}  # two old ones removed at once


def test_a_fresh_run_refuses_another_runs_checkpoints(run, tmp_path):
    """Without --resume_from_checkpoint, a run into a folder holding checkpoint-2 and -4 used to replace checkpoint-2
    with its own, prune its own newest first under --checkpoints_total_limit, and leave the other run's as `latest`."""
    out = tmp_path / "out"
    run(out, max_train_steps=4, checkpointing_steps=2)
    before = {name: (out / f"checkpoint-{name}" / "training_state.json").read_text() for name in (2, 4)}
    with pytest.raises(ValueError, match=r"already holds another run's checkpoints \(checkpoint-2, checkpoint-4\): continue that "
                                         r"run with --resume_from_checkpoint latest, or start this one in another --output_dir"):
        run(out, max_train_steps=3, checkpointing_steps=1, checkpoints_total_limit=2, seed=7)
    assert {name: (out / f"checkpoint-{name}" / "training_state.json").read_text() for name in (2, 4)} == before


def test_ema_checkpoints_hold_unet_ema_and_resume(run, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "out"
    run(out, max_train_steps=5, checkpointing_steps=2, use_ema=True)
    assert checkpoints(out) == {2, 4}
    for name in ("unet", "unet_ema"):
        UNet2DConditionModel.from_pretrained(out, subfolder=f"checkpoint-4/{name}")
    shutil.rmtree(out / "checkpoint-2")
    run(out, max_train_steps=7, checkpointing_steps=2, resume_from_checkpoint="checkpoint-4", use_ema=True)
    assert checkpoints(out) == {4, 6}


def test_full_fine_tune_leaves_a_pipeline_with_the_trained_unet(run, tiny_sdxl, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "out"
    run(out, max_train_steps=2, checkpointing_steps=2)
    pipe = DiffusionPipeline.from_pretrained(out)
    trained = load_file(out / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors")
    base = load_file(tiny_sdxl / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, trained[k]), k
    image = pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_a_mixed_precision_run_exports_one_dtype_and_the_base_text_encoders(run, tiny_sdxl, tmp_path):
    """Under --mixed_precision the frozen text encoders and VAE run in bf16; the export used to save those copies,
    rounded for good, beside the fp32 UNet, and the pipeline loaded as saved failed at its first call."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "out"
    run(out, max_train_steps=1, mixed_precision="bf16")
    pipe = DiffusionPipeline.from_pretrained(out)
    assert {p.dtype for name in ("unet", "vae", "text_encoder", "text_encoder_2") for p in getattr(pipe, name).parameters()} == {torch.float32}
    for name in ("text_encoder", "text_encoder_2", "vae"):
        base = load_file(next((tiny_sdxl / name).glob("*.safetensors")))
        saved = load_file(next((out / name).glob("*.safetensors")))
        assert all(torch.equal(saved[k], v) for k, v in base.items()), name  # the base's weights, not bf16 copies
    image = pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_with_ema_the_pipeline_holds_the_ema_weights(run, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "out"
    run(out, max_train_steps=2, checkpointing_steps=2, use_ema=True, ema_decay=0.5)
    pipe = DiffusionPipeline.from_pretrained(out)
    ema = load_file(out / "checkpoint-2" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    raw = load_file(out / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, ema[k]), k


def test_lora_checkpoints_hold_loadable_lora_weights_and_resume(run, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "out"
    run(out, max_train_steps=3, checkpointing_steps=2, use_lora=True)
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(out / "checkpoint-2")
    run(out, max_train_steps=4, checkpointing_steps=2, use_lora=True, resume_from_checkpoint="latest")
    assert checkpoints(out) == {2, 4}
    with pytest.raises(ValueError, match="drop --use_lora"):
        run(tmp_path / "full", max_train_steps=1, checkpointing_steps=1)
        run(tmp_path / "full", max_train_steps=2, use_lora=True, resume_from_checkpoint="latest")


def test_resume_with_ema_continues_exactly(run, tmp_path):
    run(tmp_path / "straight", max_train_steps=4, use_ema=True, ema_decay=0.5)
    run(tmp_path / "resumed", max_train_steps=2, checkpointing_steps=2, use_ema=True, ema_decay=0.5)
    run(tmp_path / "resumed", max_train_steps=4, resume_from_checkpoint="latest", use_ema=True, ema_decay=0.5)
    straight = load_file(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "unet" / "diffusion_pytorch_model.safetensors")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], atol=1e-6, rtol=0)


def test_resuming_a_finished_run_trains_no_further_step(run, tmp_path):
    """Resuming from the checkpoint of the last step (a preempted last step, or a rerun with `latest`) exports the
    same model; it used to train one more window when the last step was not at an epoch's end (4 updates per epoch)."""
    out = tmp_path / "out"
    run(out, max_train_steps=3, checkpointing_steps=3)
    first = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    run(out, max_train_steps=3, checkpointing_steps=3, resume_from_checkpoint="latest")
    again = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert checkpoints(out) == {3}
    for k in first:
        assert torch.equal(again[k], first[k]), k


def test_resume_refuses_another_batch_or_accumulation(run, tmp_path):
    """The same global step is another data position under another layout: refuse, and say what to do."""
    out = tmp_path / "out"
    run(out, max_train_steps=2, checkpointing_steps=2)
    state = json.loads((out / "checkpoint-2" / "training_state.json").read_text())
    assert state["layout"] == {"num_processes": 1, "train_batch_size": 1, "gradient_accumulation_steps": 1}
    with pytest.raises(ValueError, match=r"1 process\(es\) x --train_batch_size 1 x --gradient_accumulation_steps 1, "
                                         r"but this run has 1 process\(es\) x --train_batch_size 2"):
        run(out, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest", train_batch_size=2)
    with pytest.raises(ValueError, match="--gradient_accumulation_steps 2"):
        run(out, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest", gradient_accumulation_steps=2)


def test_resume_refuses_optimisation_flags_it_would_ignore(run, tmp_path):
    """accelerate restores the optimizer's learning rate, betas and weight decay, the schedule's base rates and the
    EMA's decay: a resume with other values trained on with the checkpoint's, while the model card showed the new."""
    out = tmp_path / "out"
    run(out, max_train_steps=2, checkpointing_steps=2, use_ema=True, ema_decay=0.5)
    state = json.loads((out / "checkpoint-2" / "training_state.json").read_text())
    assert state["optimisation"]["learning_rate"] == 1e-3 and state["optimisation"]["ema_decay"] == 0.5
    with pytest.raises(ValueError, match=r"--learning_rate 1e-05 \(checkpoint: 0.001\), --ema_decay 0.9 \(checkpoint: 0.5\), but resuming"):
        run(out, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest", use_ema=True, learning_rate=1e-5, ema_decay=0.9)
    run(out, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest", use_ema=True, ema_decay=0.5)  # the same: resumes
    assert checkpoints(out) == {2, 4}


def test_a_checkpoint_is_on_disk_before_it_is_renamed_and_stale_temp_folders_go(run, tmp_path, monkeypatch):
    """A rename without fsync can leave a machine crash with checkpoint-N whose files are truncated, which `latest`
    would pick; a save killed before its rename left .tmp-checkpoint-N until that step was saved again."""
    import os

    out = tmp_path / "out"
    (out / ".tmp-checkpoint-7").mkdir(parents=True)
    (out / ".tmp-checkpoint-7" / "half.bin").write_bytes(b"x")
    synced = []
    real_open = os.open

    def open_and_note(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        synced.append((fd, str(path)))
        return fd

    monkeypatch.setattr(os, "open", open_and_note)
    fsynced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(dict(synced)[fd]), real_fsync(fd)))
    run(out, max_train_steps=1, checkpointing_steps=1)
    assert not (out / ".tmp-checkpoint-7").exists() and checkpoints(out) == {1}
    temp = str(out / ".tmp-checkpoint-1")
    files = [path for path in fsynced if path.startswith(temp + os.sep)]
    assert any(path.endswith("training_state.json") for path in files) and any(path.endswith(".safetensors") for path in files)
    assert fsynced.index(temp) > max(fsynced.index(path) for path in files)  # the folder after its files
    assert fsynced[-1] == str(out)  # and the rename


def test_resume_refuses_another_length_for_a_schedule_laid_out_over_it(run, tmp_path):
    """A cosine schedule restores its step counter, and its curve is rebuilt from --max_train_steps: resumed with
    another length, the rate jumped. A constant schedule does not depend on the length, so a run may be extended."""
    out = tmp_path / "cosine"
    run(out, max_train_steps=2, checkpointing_steps=2, lr_scheduler="cosine")
    with pytest.raises(ValueError, match=r"--max_train_steps 4 \(checkpoint: 2\) .*--lr_scheduler cosine was laid out over"):
        run(out, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest", lr_scheduler="cosine")
    run(tmp_path / "constant", max_train_steps=2, checkpointing_steps=2)
    run(tmp_path / "constant", max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest")
    assert checkpoints(tmp_path / "constant") == {2, 4}



def test_the_rewards_counters_continue_across_a_resume(run, tmp_path):
    """A reward counts from its own start (grader failures, unscored images); checkpoint-4 of a run resumed at step 2
    records the same totals as that of an uninterrupted run, where they used to restart from 0."""
    from rewards.base import Reward, RewardOutput
    from rewards.registry import REWARDS

    class Counting(Reward):
        name = "counting"

        def __init__(self):
            self.images = 0

        def evaluate(self, images, prompts):
            self.images += len(images)
            return RewardOutput(torch.tensor([float(image.getpixel((0, 0))[0]) for image in images]), {})

        def counters(self):
            return {"counting/images": self.images}

    REWARDS["counting"] = lambda args, device, dtype: Counting()
    try:
        def recorded(out):
            return json.loads((out / "checkpoint-4" / "training_state.json").read_text())["running"]["reward_counters"]

        run(tmp_path / "straight", max_train_steps=4, checkpointing_steps=2, reward_model="counting")
        run(tmp_path / "resumed", max_train_steps=2, checkpointing_steps=2, reward_model="counting")
        run(tmp_path / "resumed", max_train_steps=4, checkpointing_steps=2, reward_model="counting", resume_from_checkpoint="latest")
        assert recorded(tmp_path / "straight")["counting/images"] > 0
        assert recorded(tmp_path / "resumed") == recorded(tmp_path / "straight")
    finally:
        del REWARDS["counting"]
