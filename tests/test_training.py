"""The shared Accelerate loop through the real scripts, in-process (fast) on the tiny SDXL:
selection, the gradient pass, skips, the non-finite guard, checkpoints and exact resume, bad data."""
from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_args, write_image_folder

import train_rlhf_diffusion_sharpening_sdxl as rlhf
import train_sft_diffusion_sharpening_sdxl as sft
from sharpening import training


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; reset accelerate's singletons and our SIGTERM hook."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    signal.signal(signal.SIGTERM, previous)


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def sft_trainer(tiny_sdxl, tmp_path, **overrides):
    data = write_image_folder(tmp_path / "data", count=overrides.pop("count", 8))
    args = sft.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", train_data_dir=data, **overrides))
    from sharpening.data import ImageTextDataset, collate_image_text, load_hf_dataset

    dataset = ImageTextDataset(load_hf_dataset(None, str(data)), "image", "text", args.resolution, False, False, args.seed)
    return training.Trainer(args, dataset, collate_image_text, needs_reference=False, variant="SFT")


class RiggedReward:
    """Scores x0 previews by a fixed table: step_reward[candidate, prompt] at every state."""

    name = "rigged"

    def __init__(self, table: torch.Tensor):
        self.table = table  # (n, B)

    def evaluate(self, images, prompts):
        from reward import RewardOutput

        n, batch = self.table.shape
        m = len(images) // (n * batch)
        total = self.table.flatten().repeat(m)
        return RewardOutput(total=total, components={"rigged": total})

    def counters(self):
        return {}


def test_sft_trains_each_prompt_on_its_own_winner_with_m_grad_rows(tiny_sdxl, tmp_path):
    trainer = sft_trainer(tiny_sdxl, tmp_path, max_train_steps=1)
    # Prompt 0's best candidate is 2, prompt 1's is 0: a flattened argmax would pick only prompt 0's.
    trainer.reward = RiggedReward(torch.tensor([[0.1, 0.9], [0.2, 0.5], [0.8, 0.3]]))
    calls, captured = [], {}
    unet = trainer.unet
    original_forward = unet.forward

    def counting_forward(sample, timestep, *a, **k):
        calls.append((torch.is_grad_enabled(), sample.shape[0]))
        if torch.is_grad_enabled():
            captured["states"], captured["timesteps"] = sample.detach().clone(), timestep.detach().clone()
        return original_forward(sample, timestep, *a, **k)

    unet.forward = counting_forward
    explored = {}
    original_explore = trainer.explore_candidates

    def keep(*a, **k):
        explored["c"] = original_explore(*a, **k)
        return explored["c"]

    trainer.explore_candidates = keep
    trainer.train(sft.sft_step)

    candidates = explored["c"]
    assert candidates.selection.winner.tolist() == [2, 0]
    m, n, batch = trainer.num_steps, 3, 2
    grad_calls = [size for grad, size in calls if grad]
    no_grad_calls = [size for grad, size in calls if not grad]
    assert grad_calls == [m * batch]  # one batched call over the winner's m states, nothing else with grad
    assert no_grad_calls[: m] == [n * batch] * m  # exploration: m steps over all n x B candidates
    states = candidates.exploration.states  # (m, n*B, ...)
    expected = torch.cat([states[k, [2 * batch + 0, 0 * batch + 1]] for k in range(m)])
    torch.testing.assert_close(captured["states"], expected)
    assert not any(s.requires_grad for s in candidates.exploration.states)


def test_nonfinite_loss_leaves_weights_unchanged_then_aborts(tiny_sdxl, tmp_path):
    trainer = sft_trainer(tiny_sdxl, tmp_path, max_train_steps=5, max_nonfinite_steps=3)
    before = {k: v.detach().clone() for k, v in trainer.raw_unet.named_parameters()}

    def nan_step(tr, batch, generator):
        result = sft.sft_step(tr, batch, generator)
        return training.StepResult(result.loss * float("nan"), result.num_trained, result.logs)

    with pytest.raises(RuntimeError, match="3 consecutive updates had a non-finite loss"):
        trainer.train(nan_step)
    assert trainer.counters["nonfinite_skips"] == 3
    for k, v in trainer.raw_unet.named_parameters():
        assert torch.equal(v, before[k]), k


def test_one_nonfinite_step_is_skipped_and_training_goes_on(tiny_sdxl, tmp_path):
    trainer = sft_trainer(tiny_sdxl, tmp_path, max_train_steps=3)
    seen = []

    def flaky_step(tr, batch, generator):
        result = sft.sft_step(tr, batch, generator)
        seen.append(1)
        if len(seen) == 2:
            before = {k: v.detach().clone() for k, v in tr.raw_unet.named_parameters()}
            seen.append(before)
            return training.StepResult(result.loss + float("inf"), result.num_trained, result.logs)
        if len(seen) == 4:  # the step after the skipped one starts from the same weights
            for k, v in tr.raw_unet.named_parameters():
                assert torch.equal(v, seen[2][k])
        return result

    trainer.train(flaky_step)
    assert trainer.counters["nonfinite_skips"] == 1
    assert (tmp_path / "out" / "unet").is_dir()


def test_unscored_candidates_never_train(tiny_sdxl, tmp_path):
    trainer = sft_trainer(tiny_sdxl, tmp_path, max_train_steps=2, reward_model="unavailable")
    before = {k: v.detach().clone() for k, v in trainer.raw_unet.named_parameters()}
    trainer.train(sft.sft_step)
    assert trainer.counters["no_preference_skips"] == 2
    for k, v in trainer.raw_unet.named_parameters():
        assert torch.equal(v, before[k]), k


def run_sft(tiny_sdxl, data, out, **overrides):
    args = sft.parse_args(tiny_args(tiny_sdxl, out, train_data_dir=data, **overrides))
    sft.main(args)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return args


def test_resume_in_the_middle_of_an_epoch_continues_exactly(tiny_sdxl, tmp_path):
    # 6 rows / batch 2 = 3 micro-batches per epoch; accumulation 2 -> updates of 2 and 1 micro-batches.
    data = write_image_folder(tmp_path / "data", count=6)
    common = dict(gradient_accumulation_steps=2, max_train_steps=4, proportion_empty_prompts=0.3, random_flip=True)
    run_sft(tiny_sdxl, data, tmp_path / "straight", **common)
    run_sft(tiny_sdxl, data, tmp_path / "resumed", checkpointing_steps=1, checkpoints_total_limit=2, **common)
    # Pruned to the last 2, no temp folder left behind.
    names = sorted(p.name for p in (tmp_path / "resumed").iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-3", "checkpoint-4"]
    state = json.loads((tmp_path / "resumed" / "checkpoint-3" / "training_state.json").read_text())
    assert state["global_step"] == 3 and state["seed"] == 0

    # Resume from step 1 (mid-epoch) in a fresh folder that holds only that checkpoint.
    run_sft(tiny_sdxl, data, tmp_path / "partial", checkpointing_steps=1, **(common | {"max_train_steps": 1}))
    run_sft(tiny_sdxl, data, tmp_path / "partial", resume_from_checkpoint="latest", checkpointing_steps=100, **common)
    straight, resumed = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "partial")
    base = load_file(tiny_sdxl / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(straight[k], base[k]) for k in base)  # it trained
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], atol=1e-6, rtol=0)


def test_corrupt_image_is_skipped_counted_and_named(tiny_sdxl, tmp_path, caplog):
    data = write_image_folder(tmp_path / "data", count=8, corrupt=(3,))
    caplog.set_level(logging.WARNING)
    run_sft(tiny_sdxl, data, tmp_path / "ok", max_train_steps=4, max_bad_fraction=0.5)
    assert "img_003.png" in caplog.text
    assert (tmp_path / "ok" / "unet").is_dir()
    with pytest.raises(RuntimeError, match="max_bad_fraction"):
        run_sft(tiny_sdxl, data, tmp_path / "strict", max_train_steps=4, max_bad_fraction=0.0)


def test_missing_column_fails_before_any_model_loads(tmp_path):
    data = write_image_folder(tmp_path / "data", count=4)
    args = sft.parse_args(tiny_args(tmp_path / "no-such-model", tmp_path / "out", train_data_dir=data, caption_column="caption"))
    with pytest.raises(ValueError, match=r"--caption_column='caption'.*Available columns: \['image', 'text'\]"):
        sft.main(args)


def test_rlhf_full_reference_stays_frozen_and_policy_moves(tiny_sdxl, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    args = rlhf.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", prompt_file=prompts, max_train_steps=2))
    trainer = training.Trainer(args, rlhf.PromptDataset(rlhf.load_prompts(args)), rlhf.collate_prompts, needs_reference=True, variant="RLHF")
    ref_before = {k: v.clone() for k, v in trainer.reference_unet.state_dict().items()}
    policy_before = {k: v.detach().clone() for k, v in trainer.raw_unet.named_parameters()}
    trainer.train(rlhf.rlhf_step)
    for k, v in trainer.reference_unet.state_dict().items():
        assert torch.equal(v, ref_before[k]), k
    assert any(not torch.equal(v, policy_before[k]) for k, v in trainer.raw_unet.named_parameters())


def test_rlhf_lora_holds_one_unet_and_reference_is_the_base(tiny_sdxl, tmp_path):
    import gc

    from diffusers import UNet2DConditionModel

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    args = rlhf.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", prompt_file=prompts, max_train_steps=2, use_lora=True))
    trainer = training.Trainer(args, rlhf.PromptDataset(rlhf.load_prompts(args)), rlhf.collate_prompts, needs_reference=True, variant="RLHF")
    gc.collect()
    assert trainer.reference_unet is None
    assert sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects()) == 1
    # With adapters disabled the model is exactly the base UNet.
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([501, 1])
    cond = trainer.conditioning(["a", "b"], trainer.default_time_ids(2))
    from sharpening.sampler import unet_forward

    trainer.train(rlhf.rlhf_step)
    with torch.no_grad():
        torch.testing.assert_close(trainer.reference(x, t, cond), unet_forward(base)(x, t, cond))
        assert not torch.allclose(trainer.policy(grad=False)(x, t, cond), trainer.reference(x, t, cond))


def test_rlhf_all_tied_rewards_give_no_update(tiny_sdxl, tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    args = rlhf.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", prompt_file=prompts, max_train_steps=2, reward_model="constant"))
    trainer = training.Trainer(args, rlhf.PromptDataset(rlhf.load_prompts(args)), rlhf.collate_prompts, needs_reference=True, variant="RLHF")
    before = {k: v.detach().clone() for k, v in trainer.raw_unet.named_parameters()}
    caplog.set_level(logging.INFO)
    trainer.train(rlhf.rlhf_step)
    assert trainer.counters["no_preference_skips"] == 2
    assert "update skipped" in caplog.text
    for k, v in trainer.raw_unet.named_parameters():
        assert torch.equal(v, before[k]), k


def test_lora_rank_and_alpha_travel_with_the_saved_weights(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    data = write_image_folder(tmp_path / "data", count=4)
    run_sft(tiny_sdxl, data, tmp_path / "out", max_train_steps=1, use_lora=True, lora_rank=4, lora_alpha=16)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_lora_weights(tmp_path / "out")
    config = next(iter(pipe.unet.peft_config.values()))
    assert (config.r, config.lora_alpha) == (4, 16)  # scale alpha/r = 4, not the default 1


def test_resume_accepts_a_checkpoint_name_inside_output_dir(tiny_sdxl, tmp_path, caplog):
    data = write_image_folder(tmp_path / "data", count=4)
    run_sft(tiny_sdxl, data, tmp_path / "out", max_train_steps=1, checkpointing_steps=1)
    caplog.set_level(logging.INFO)
    run_sft(tiny_sdxl, data, tmp_path / "out", max_train_steps=2, resume_from_checkpoint="checkpoint-1")
    assert "at step 1" in caplog.text


def test_prompt_file_csv_with_drawbench_columns(tmp_path):
    from sharpening.data import read_prompt_file

    path = tmp_path / "drawbench.csv"
    path.write_text('Prompts,Category\n"A red colored car.",Colors\n,Colors\n"A black colored car.",Colors\n')
    prompts, stats = read_prompt_file(path)
    assert prompts == ["A red colored car.", "A black colored car."]
    assert stats["blank_skipped"] == 1
    (tmp_path / "p.json").write_text('["a cat"]')
    with pytest.raises(ValueError, match="use .txt"):
        read_prompt_file(tmp_path / "p.json")


def test_rlhf_needs_two_candidates(tiny_sdxl, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    with pytest.raises(SystemExit):
        rlhf.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", prompt_file=prompts, num_noisy_latents=1))


@pytest.mark.parametrize("target", ["noise", "exact", "endpoint"])
def test_trajectory_mse_targets_by_hand(target):
    """The three regression targets of the winner/loser states, against the arithmetic written out:
    noise = the candidate's starting noise; exact = the noise mapping the shared x0 to each state;
    endpoint = the noise mapping the PATH'S OWN last x0 prediction to each state."""
    from types import SimpleNamespace

    from sharpening.sampler import DDIM
    from sharpening.trajectory import Exploration, select
    from toyworld.train_base import build_scheduler

    ddim = DDIM(dict(build_scheduler().config), 20)
    n, batch, m = 3, 2, 2
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 4, 2, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(n * batch, 4, 2, 2, generator=g, dtype=torch.float64)
    timesteps = torch.tensor([[901, 501] * n, [851, 451] * n])  # (m, n*B), per-row timesteps
    exploration = Exploration(states=torch.randn(m, n * batch, 4, 2, 2, generator=g, dtype=torch.float64), timesteps=timesteps,
                              x0_preds=torch.randn(m, n * batch, 4, 2, 2, generator=g, dtype=torch.float64))
    path_rewards = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.8, 0.4])  # candidate-major: prompt 0 -> 0.1, 0.5, 0.8
    candidates = training.Candidates(x0, noise, exploration, path_rewards, select(path_rewards, n))
    assert candidates.selection.winner.tolist() == [2, 0] and candidates.selection.loser.tolist() == [0, 1]
    which = torch.cat([candidates.selection.winner, candidates.selection.loser])

    def model(states, t, cond):  # any fixed function of the inputs
        return 0.5 * states + t.view(-1, 1, 1, 1) / 1000

    host = SimpleNamespace(num_steps=m, ddim=ddim)
    cond = SimpleNamespace(repeat=lambda k: None)
    got = training.Trainer.trajectory_mse(host, model, x0.repeat(2, 1, 1, 1), candidates, which, cond, target)

    alphas_cumprod = torch.as_tensor(build_scheduler().alphas_cumprod, dtype=torch.float64)
    for j, candidate in enumerate(which.tolist()):
        row = candidate * batch + j % batch
        for k in range(m):
            state, t = exploration.states[k, row], int(timesteps[k, row])
            abar = alphas_cumprod[t]
            clean = {"noise": None, "exact": x0[j % batch], "endpoint": exploration.x0_preds[-1, row]}[target]
            eps = noise[row] if clean is None else (state - abar.sqrt() * clean) / (1 - abar).sqrt()
            expected = ((0.5 * state + t / 1000 - eps) ** 2).mean()
            torch.testing.assert_close(got[k, j], expected.to(got.dtype), rtol=1e-6, atol=1e-9)
