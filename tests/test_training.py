"""The shared Accelerate loop through the real scripts, in-process (fast) on the tiny SDXL:
selection, the gradient pass, skips, the non-finite guard, checkpoints and exact resume, bad data."""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import reset_accelerate_state, tiny_args, write_image_folder

import train_rlhf_diffusion_sharpening_sdxl as rlhf
import train_sft_diffusion_sharpening_sdxl as sft
from sharpening import training


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


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


def keep_explorations(trainer) -> dict:
    """Wrap trainer.explore_candidates so that the returned dict holds the last step's candidates under "c" and
    every step's, in order, under "all"."""
    explored, original_explore = {"all": []}, trainer.explore_candidates

    def keep(*a, **k):
        explored["c"] = original_explore(*a, **k)
        explored["all"].append(explored["c"])
        return explored["c"]

    trainer.explore_candidates = keep
    return explored


def test_sft_trains_each_prompt_on_its_own_winner_with_m_grad_rows(tiny_sdxl, tmp_path):
    # Eq. 9's target trains the winner's states only, which makes the per-prompt selection visible here.
    trainer = sft_trainer(tiny_sdxl, tmp_path, max_train_steps=1, sft_target="noise")
    # Prompt 0's best candidate is 2, prompt 1's is 0: a flattened argmax would pick only prompt 0's.
    trainer.reward = RiggedReward(torch.tensor([[0.1, 0.9], [0.2, 0.5], [0.8, 0.3]]))
    calls, captured = [], {}
    unet = trainer.model.unet
    original_forward = unet.forward

    def counting_forward(sample, timestep, *a, **k):
        calls.append((torch.is_grad_enabled(), sample.shape[0]))
        if torch.is_grad_enabled():
            captured["states"], captured["timesteps"] = sample.detach().clone(), timestep.detach().clone()
        return original_forward(sample, timestep, *a, **k)

    unet.forward = counting_forward
    explored = keep_explorations(trainer)
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


@pytest.mark.parametrize("anchor_weight", [0.0, 0.5])
def test_the_sft_loss_is_the_targets_mse_plus_the_weighted_data_anchor(tiny_sdxl, tmp_path, anchor_weight):
    """sft_step's value, worked out here from what it predicted: per prompt, the mean over its rows of the squared
    error to the default target (the winner's end image, through the exact noise) plus --data_anchor_weight times
    the squared error to the noise that maps the same state onto the prompt's DATA latent."""
    from sharpening.losses import per_sample_mse

    trainer = sft_trainer(tiny_sdxl, tmp_path, max_train_steps=1, data_anchor_weight=anchor_weight)
    captured, seen = {}, []
    predict, encode = trainer.predict, trainer.encode_images
    trainer.predict = lambda model, rows, cond: captured.setdefault("grad", (rows, predict(model, rows, cond)))[1]
    trainer.encode_images = lambda pixels, generator: captured.setdefault("x0", encode(pixels, generator))
    trainer.train(lambda tr, batch, generator: seen.append(sft.sft_step(tr, batch, generator)) or seen[-1])

    rows, prediction = captured["grad"]
    prediction = prediction.detach().double()
    abar = trainer.sampler.alpha_bar(rows.timesteps).double().view(-1, 1, 1, 1)

    def exact_noise(clean):  # the epsilon that maps each row's state onto `clean`
        return (rows.states.double() - abar.sqrt() * clean.double()) / (1 - abar).sqrt()

    winner_end = rows.clean  # best_endpoint: every candidate's states toward its prompt's winning end image
    errors = per_sample_mse(prediction, exact_noise(winner_end))
    errors = errors + anchor_weight * per_sample_mse(prediction, exact_noise(captured["x0"][rows.prompt]))
    expected = torch.stack([errors[rows.prompt == b].mean() for b in range(2)])
    assert seen[0].trained.all()
    torch.testing.assert_close(seen[0].prompt_losses.double(), expected.double(), rtol=1e-4, atol=0)


def test_path_reward_final_scores_each_paths_finished_image_and_targets_it(tiny_sdxl, tmp_path):
    # --path_reward final: every candidate runs on to the end of the grid, only the n x B finished images are scored,
    # and best_endpoint regresses all n paths' states onto the winner's FINISHED image (not its last preview).
    from sharpening.targets import sft_rows

    trainer = sft_trainer(tiny_sdxl, tmp_path, max_train_steps=1, path_reward="final", report_to="tensorboard",
                          log_trajectories_every=1, log_trajectories_prompts=2)
    rigged = RiggedReward(torch.tensor([[0.1, 0.9], [0.2, 0.5], [0.8, 0.3]]))
    scored = []
    trainer.reward = SimpleNamespace(evaluate=lambda images, prompts: scored.append(len(images)) or rigged.evaluate(images, prompts),
                                     counters=dict)
    explored = keep_explorations(trainer)
    trainer.train(sft.sft_step)

    c, n, batch = explored["c"], 3, 2
    assert scored == [n * batch] and c.selection.winner.tolist() == [2, 0]
    finished = c.exploration.finished
    assert finished is not None and finished.shape == c.exploration.x0_preds.shape[1:]
    rows = sft_rows("best_endpoint", trainer.sampler, c)
    winners_finished = finished[[2 * batch + 0, 0 * batch + 1]]
    torch.testing.assert_close(rows.clean, winners_finished[rows.prompt].to(rows.clean))
    assert len(rows.prompt) == n * trainer.num_steps * batch
    assert any((tmp_path / "out" / "logs").rglob("events.out.tfevents*"))  # the one-column trajectory grid was drawn


def test_guided_exploration_finishes_each_path_against_its_own_negative_branch(tiny_sdxl, tmp_path):
    # --explore_guidance_scale > 1 with SFT's default --path_reward final: the finishing pass runs only the paths still
    # on the grid, each guided against its own row of the negative branch; stepping each path alone, guided against
    # a negative branch built for that row only, must end at the same finished image.
    from sharpening.families import with_guidance

    trainer = sft_trainer(tiny_sdxl, tmp_path, max_train_steps=1, explore_guidance_scale=3.0)
    explore, grid, compared = trainer.explore_candidates, trainer.sampler.grid, []

    def explore_and_compare(x0, cond, prompts, generator):
        c = explore(x0, cond, prompts, generator)
        cond_n = cond.repeat(3)
        for row in range(len(cond_n)):
            alone = cond_n.select(torch.tensor([row]))
            model = with_guidance(trainer.family, trainer.parts, trainer.policy(grad=False), alone, 3.0, trainer.device)
            x, first = c.exploration.states[0, row : row + 1], int((grid == c.exploration.timesteps[0, row]).nonzero())
            for k in range(first, len(grid)):
                x, x0_hat = trainer.sampler.step(model(x, grid[k].view(1), alone), torch.tensor([k]), x)
            compared.append((c.exploration.finished[row : row + 1], x0_hat))
        return c

    trainer.explore_candidates = explore_and_compare
    trainer.train(sft.sft_step)
    assert len(compared) == 3 * 2
    for finished, alone in compared:
        torch.testing.assert_close(finished, alone, rtol=0, atol=1e-5)


def test_start_window_flags_reach_exploration_and_an_empty_window_is_refused(tiny_sdxl, tmp_path):
    # The 4-step grid is 751, 501, 251, 1; with m = 2, starts at 751 and 501 are the ones at or above 500.
    trainer = sft_trainer(tiny_sdxl, tmp_path, max_train_steps=3, min_start_timestep=500, train_batch_size=4)
    explored = keep_explorations(trainer)
    trainer.train(sft.sft_step)
    starts = [t for c in explored["all"] for t in c.exploration.timesteps[0].tolist()]
    assert len(starts) == 3 * 3 * 4 and set(starts) == {751, 501}
    reset_accelerate_state()
    with pytest.raises(ValueError, match="leave no start on the grid"):
        sft_trainer(tiny_sdxl, tmp_path / "empty", min_start_timestep=600, max_start_timestep=700)
    reset_accelerate_state()


def test_nonfinite_loss_leaves_weights_unchanged_then_aborts(tiny_sdxl, tmp_path):
    trainer = sft_trainer(tiny_sdxl, tmp_path, max_train_steps=5, max_nonfinite_steps=3)
    before = {k: v.detach().clone() for k, v in trainer.model.raw_unet.named_parameters()}

    def nan_step(tr, batch, generator):
        result = sft.sft_step(tr, batch, generator)
        return training.StepResult(result.prompt_losses * float("nan"), result.trained, result.logs)

    with pytest.raises(RuntimeError, match="3 consecutive updates had a non-finite loss"):
        trainer.train(nan_step)
    assert trainer.counters["nonfinite_skips"] == 3
    for k, v in trainer.model.raw_unet.named_parameters():
        assert torch.equal(v, before[k]), k


def test_endless_fp16_overflow_stops_the_run(tiny_sdxl, tmp_path, monkeypatch):
    """GradScaler skips an overflowing step and halves its scale; a gradient that is non-finite at every scale must
    not run on for the whole budget with frozen weights."""
    monkeypatch.setattr(training, "FP16_OVERFLOW_LIMIT", 3)
    trainer = sft_trainer(tiny_sdxl, tmp_path, max_train_steps=6)
    monkeypatch.setattr(trainer, "_finish_update", lambda window: "overflow")
    with pytest.raises(RuntimeError, match="3 consecutive fp16 updates overflowed"):
        trainer.train(sft.sft_step)


def test_counts_are_summed_over_the_window_and_rates_averaged():
    window = training.UpdateWindow()
    for skipped, unscored, accuracy in ((1.0, 0.0, 0.5), (2.0, 3.0, 1.0)):
        window.add(training.StepResult(torch.ones(2), torch.tensor([True, False]),
                                       {"skipped_prompts": skipped, "reward/unscored_candidates": unscored, "implicit_accuracy": accuracy}))
    logs = window.logs()
    assert logs["skipped_prompts"] == 3.0 and logs["reward/unscored_candidates"] == 3.0 and logs["trained_prompts"] == 2.0
    assert logs["implicit_accuracy"] == 0.75


def test_per_prompt_logs_are_means_over_the_prompts_of_the_update():
    """One preferred prompt (accuracy 0, gap 0.1) in one micro-batch, four (accuracy 1, gap 0.5) in the next: the update
    is 4 of 5 right with a mean gap of 0.42, where a mean of the micro-batches' means said 0.5 and 0.3."""
    window = training.UpdateWindow()
    for accuracy, gap in ((torch.tensor([False]), torch.tensor([0.1])), (torch.ones(4, dtype=torch.bool), torch.full((4,), 0.5))):
        window.add(training.StepResult(torch.ones(4), torch.ones(4, dtype=torch.bool),
                                       {"implicit_accuracy": training.PooledMean.of(accuracy), "reward/winner_minus_loser": training.PooledMean.of(gap)}))
    logs = window.logs()
    assert logs["implicit_accuracy"] == pytest.approx(0.8) and logs["reward/winner_minus_loser"] == pytest.approx(0.42)
    trainer = SimpleNamespace(accelerator=SimpleNamespace(num_processes=1), reward=SimpleNamespace(counters=dict), reward_counters_before={})
    trainer._run_reward_counters = lambda per_process: training.Trainer._run_reward_counters(trainer, per_process)
    gathered = training.Trainer.gather_logs(trainer, window)
    assert gathered["implicit_accuracy"] == pytest.approx(0.8) and gathered["reward/winner_minus_loser"] == pytest.approx(0.42)


@pytest.mark.parametrize("flag", ["checkpointing_steps", "validation_epochs", "max_nonfinite_steps", "max_train_steps",
                                  "num_train_epochs", "train_batch_size", "gradient_accumulation_steps", "num_validation_images",
                                  "checkpoints_total_limit", "validation_steps", "max_train_samples"])
def test_zero_step_counts_are_refused_before_training(tiny_sdxl, tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        sft.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", train_data_dir=tmp_path, **{flag: 0}))
    assert exit_info.value.code == 2 and f"--{flag} must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    ({"seed": -1}, "--seed must be >= 0"),
    ({"max_bad_fraction": -1}, "--max_bad_fraction must be in"),
    ({"lora_rank": 16}, "add --use_lora"),
    ({"lora_alpha": 8}, "add --use_lora"),
    ({"use_lora": True, "lora_rank": 0}, "--lora_rank must be >= 1"),
    ({"ema_decay": 0.99}, "--ema_decay needs --use_ema"),
    ({"use_ema": True, "ema_decay": 1.5}, "--ema_decay must be in \\[0, 1\\]"),
    ({"max_grad_norm": -1}, "--max_grad_norm must be >= 0 \\(0: no clipping\\)"),  # clip_grad_norm_ flipped every gradient
    ({"learning_rate": 0}, "--learning_rate must be > 0"),
    ({"adam_beta1": 1.0}, "--adam_beta1 and --adam_beta2 must be in \\[0, 1\\)"),
    ({"lr_warmup_steps": -1}, "--lr_warmup_steps must be >= 0"),
    ({"lr_warmup_steps": 10}, "has no effect with --lr_scheduler constant"),  # diffusers' constant ignores it
    ({"resolution": 0}, "--resolution must be a positive multiple of 8"),  # was blamed on the data after loading
    ({"use_lora": True, "lora_alpha": 0}, "--lora_alpha must be > 0"),  # `alpha or rank` turned 0 into the rank
    ({"report_to": "aim"}, "--report_to aim: the package is not installed"),  # accelerate trained on with no tracking
    ({"api_key": "sk-1"}, "--api_key is a flag of the mllm reward, and no selected reward \\(brightness\\) uses it"),
    ({"num_validation_images": 2, "validation_steps": 5}, "--validation_steps, --num_validation_images: validation images are "
                                                          "drawn only for --validation_prompt"),
    ({"min_start_timestep": 800, "max_start_timestep": 200}, "--min_start_timestep 800 is above --max_start_timestep 200"),
    ({"max_start_timestep": 1500}, "--max_start_timestep must be a timestep in \\[0, 1000\\]"),
    ({"max_sequence_length": 600}, "--max_sequence_length must be between 1 and 512"),  # the pipelines refuse > 512
    ({"snr_gamma": 5.0, "loss_weighting": "v"}, "--snr_gamma fixes each state's weight"),  # the v weighting became a constant
    ({"log_trajectories_prompts": -1}, "--log_trajectories_prompts must be >= 0"),  # logged nothing, silently
    ({"log_trajectories_prompts": 4}, "--log_trajectories_prompts: the trajectory logs it shapes"),  # tiny_args: --report_to none
])
def test_flags_that_would_fail_late_or_do_nothing_are_refused_when_parsed(tiny_sdxl, tmp_path, capsys, flags, message):
    """Each was accepted and then failed after the models had loaded (seed, rank 0), stopped with a misleading message
    (a negative bad fraction) or did nothing at all (LoRA shape without --use_lora: a full fine-tune at a LoRA rate).
    Each is argparse's usage error (status 2, the message on stderr), not a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        sft.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", train_data_dir=tmp_path, **flags))
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and re.search(message, error) and "Traceback" not in error
    with pytest.raises(SystemExit):  # argparse's choices: diffusers' get_scheduler would fail after loading
        sft.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", train_data_dir=tmp_path, lr_scheduler="cosine_annealing"))


@pytest.mark.parametrize("script, flags, message", [
    ("rlhf", {"beta_dpo": 0}, "--beta_dpo must be > 0"),  # beta 0: the UNet stayed bit-identical while steps 'updated'
    ("rlhf", {"reward_margin_scale": -1}, "--reward_margin_scale >= 0"),
    ("sft", {"data_anchor_weight": -1}, "--data_anchor_weight must be >= 0"),
    # RLHF reads prompts from one source and no images: these were accepted and ignored
    ("rlhf", {"train_data_dir": "data"}, "--train_data_dir: the prompts come from --prompt_file"),
    ("rlhf", {"image_column": "img", "max_bad_fraction": 0}, "--image_column, --max_bad_fraction: RLHF trains on captions"),
    # --dpo_target fresh draws noise levels, but only --weighting_scheme logit_normal reads these: uniform, silently
    ("rlhf", {"dpo_target": "fresh", "logit_mean": 1.0}, "--logit_mean: read only by --weighting_scheme logit_normal"),
    ("rlhf", {"dpo_target": "fresh", "weighting_scheme": "logit_normal", "logit_std": 0}, "--logit_std must be > 0"),
])
def test_objective_weights_that_invert_or_cancel_training_are_refused(tiny_sdxl, tmp_path, capsys, script, flags, message):
    module = {"sft": sft, "rlhf": rlhf}[script]
    data = {"train_data_dir": tmp_path} if script == "sft" else {"prompt_file": tmp_path / "p.txt"}
    with pytest.raises(SystemExit):
        module.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", **data, **flags))
    assert message in capsys.readouterr().err


def test_data_smaller_than_one_batch_is_refused_before_the_models_load(tiny_sdxl, tmp_path, monkeypatch):
    from sharpening import sdxl

    monkeypatch.setattr(sdxl, "load", lambda *a, **k: pytest.fail("loaded the model before counting the data"))
    with pytest.raises(ValueError, match=r"The data \(1 rows\) do not fill one batch of --train_batch_size 2 .* lower --train_batch_size"):
        sft_trainer(tiny_sdxl, tmp_path, count=1)
    reset_accelerate_state()


def test_reward_weights_that_cannot_be_found_fail_before_the_diffusion_model_loads(tiny_sdxl, tmp_path, monkeypatch):
    """A hub id offline (the rewards' defaults) or a folder without the weights is only known when the reward is built:
    it is built first, so the error comes before minutes of loading SDXL, not after."""
    from sharpening import sdxl

    monkeypatch.setattr(sdxl, "load", lambda *a, **k: pytest.fail("loaded the diffusion model before the reward"))
    empty = tmp_path / "no-weights"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"--image_reward_model .*no-weights.* lacks ImageReward.pt"):
        sft_trainer(tiny_sdxl, tmp_path, reward_model="image_reward", image_reward_model=str(empty))
    reset_accelerate_state()


def test_family_only_flags_are_refused_before_any_weight_loads(tiny_sd3, tmp_path, monkeypatch):
    from sharpening import sd3

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded the model before refusing the flag")

    monkeypatch.setattr(sd3, "load", no_loading)
    data = write_image_folder(tmp_path / "data", count=2)
    for flags in ({"prediction_type": "v_prediction"}, {"loss_weighting": "v"}, {"true_cfg_scale": 3.0}):
        with pytest.raises(ValueError, match="drop the flag|FLUX.1's true"):
            run_sft(tiny_sd3, data, tmp_path / "o", max_train_steps=1, max_sequence_length=32, **flags)
        reset_accelerate_state()


def test_the_model_is_saved_before_the_last_validation_images(tiny_sdxl, tmp_path, monkeypatch):
    """diffusers' scripts save first: a failure while generating the final validation images (out of memory, a
    tracker error) must not cost the trained model."""
    def failing(self, step):
        raise RuntimeError("validation failed")

    monkeypatch.setattr(training.Trainer, "validate", failing)
    trainer = sft_trainer(tiny_sdxl, tmp_path, max_train_steps=1)
    with pytest.raises(RuntimeError, match="validation failed"):
        trainer.train(sft.sft_step)
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    reset_accelerate_state()


def test_each_step_is_validated_once_and_the_last_after_the_export(tiny_sdxl, tmp_path, monkeypatch):
    """--validation_steps 1 with one update per epoch (--validation_epochs 1) on 2 steps: steps 1 and 2 once each; the
    last after the model is saved. Step 1 was validated twice and step 2 twice (in the loop and after the export)."""
    seen = []
    generate = training.Trainer.generate
    monkeypatch.setattr(training.Trainer, "generate", lambda self, prompts, seed: (
        seen.append((self.last_validated_step, (tmp_path / "out" / "unet").is_dir())), generate(self, prompts, seed))[1])
    trainer = sft_trainer(tiny_sdxl, tmp_path, count=2, max_train_steps=2, validation_prompt="a red square", validation_steps=1,
                          num_validation_images=1)
    trainer.train(sft.sft_step)
    assert seen == [(1, False), (2, True)]
    reset_accelerate_state()


def test_a_plugin_flag_of_type_secret_is_masked_on_the_command_line():
    from rewards.base import Secret
    from sharpening.config import public_config, redacted_argv, secret_flag_names

    args = SimpleNamespace(grader_token=Secret("tok-SECRET"), api_key=None, learning_rate=1e-5)
    names = secret_flag_names(args)
    assert set(names) == {"api_key", "grader_token"}
    assert redacted_argv(["--grader_token", "tok-SECRET", "--grader_t=tok-2"], names) == ["--grader_token", "***", "--grader_t=***"]
    assert "grader_token" not in public_config(args)


def test_one_nonfinite_step_is_skipped_and_training_goes_on(tiny_sdxl, tmp_path):
    trainer = sft_trainer(tiny_sdxl, tmp_path, max_train_steps=3)
    seen = []

    def flaky_step(tr, batch, generator):
        result = sft.sft_step(tr, batch, generator)
        seen.append(1)
        if len(seen) == 2:
            before = {k: v.detach().clone() for k, v in tr.model.raw_unet.named_parameters()}
            seen.append(before)
            return training.StepResult(result.prompt_losses + float("inf"), result.trained, result.logs)
        if len(seen) == 4:  # the step after the skipped one starts from the same weights
            for k, v in tr.model.raw_unet.named_parameters():
                assert torch.equal(v, seen[2][k])
        return result

    trainer.train(flaky_step)
    assert trainer.counters["nonfinite_skips"] == 1
    assert (tmp_path / "out" / "unet").is_dir()


def test_unscored_candidates_never_train(tiny_sdxl, tmp_path):
    trainer = sft_trainer(tiny_sdxl, tmp_path, max_train_steps=2, reward_model="unavailable")
    before = {k: v.detach().clone() for k, v in trainer.model.raw_unet.named_parameters()}
    trainer.train(sft.sft_step)
    assert trainer.counters["no_preference_skips"] == 2
    for k, v in trainer.model.raw_unet.named_parameters():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("variant", ["sft", "rlhf"])
def test_a_prompt_whose_paths_overflowed_does_not_poison_the_update(tiny_sdxl, tmp_path, variant):
    """Prompt 1's paths are NaN (an fp16 overflow) and unscored; prompt 0 trains, though its candidate 1 overflowed
    too. The masked loss was finite, but backward through prompt 1's NaN rows made every gradient NaN, and candidate
    1's rows (the default targets train every candidate's states) made prompt 0's loss NaN: the update was skipped."""
    nan = float("nan")
    if variant == "sft":
        trainer = sft_trainer(tiny_sdxl, tmp_path, max_train_steps=1, train_batch_size=2, max_nonfinite_steps=1)
        step = sft.sft_step
    else:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red square\na blue circle\n")
        args = rlhf.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", prompt_file=prompts, max_train_steps=1, train_batch_size=2,
                                         max_nonfinite_steps=1))
        trainer = training.Trainer(args, rlhf.PromptDataset(rlhf.load_prompts(args)), rlhf.collate_prompts, needs_reference=True, variant="RLHF")
        step = rlhf.rlhf_step
    trainer.reward = RiggedReward(torch.tensor([[0.1, nan], [nan, nan], [0.5, nan]]))
    original_explore = trainer.explore_candidates

    def overflowed(*a, **k):
        candidates = original_explore(*a, **k)
        for row in (0 * 2 + 1, 1 * 2 + 1, 2 * 2 + 1, 1 * 2 + 0):  # candidate i of prompt b is row i * B + b
            for tensor in (candidates.exploration.states, candidates.exploration.x0_preds):
                tensor[:, row] = nan
        candidates.x0[1] = nan
        assert candidates.selection.has_winner.tolist() == [True, False] and candidates.selection.winner[0] == 2
        return candidates

    trainer.explore_candidates = overflowed
    before = {k: v.detach().clone() for k, v in trainer.model.raw_unet.named_parameters()}
    trainer.train(step)
    assert trainer.counters["nonfinite_skips"] == 0
    after = dict(trainer.model.raw_unet.named_parameters())
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in before)


def run_sft(tiny_sdxl, data, out, **overrides):
    args = sft.parse_args(tiny_args(tiny_sdxl, out, train_data_dir=data, **overrides))
    sft.main(args)
    reset_accelerate_state()
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


def test_one_candidate_with_an_endpoint_target_is_warned_about(tiny_sdxl, tmp_path, caplog):
    """n = 1 leaves no choice: best_endpoint becomes self-distillation (it collapsed in the n = 1 ablation)."""
    caplog.set_level(logging.WARNING)
    sft.warn_if_no_choice(sft.parse_args(tiny_args(tiny_sdxl, tmp_path, num_noisy_latents=1)))
    assert "--num_noisy_latents 1 with --sft_target best_endpoint: one candidate leaves nothing to choose" in caplog.text
    caplog.clear()
    sft.warn_if_no_choice(sft.parse_args(tiny_args(tiny_sdxl, tmp_path, num_noisy_latents=1, sft_target="noise")))  # ordinary FT
    sft.warn_if_no_choice(sft.parse_args(tiny_args(tiny_sdxl, tmp_path, num_noisy_latents=2)))
    assert "nothing to choose" not in caplog.text


def test_corrupt_image_is_skipped_counted_and_named(tiny_sdxl, tmp_path, caplog):
    data = write_image_folder(tmp_path / "data", count=8, corrupt=(3,))
    caplog.set_level(logging.WARNING)
    run_sft(tiny_sdxl, data, tmp_path / "ok", max_train_steps=4, max_bad_fraction=0.5)
    assert "img_003.png" in caplog.text
    assert (tmp_path / "ok" / "unet").is_dir()
    with pytest.raises(RuntimeError, match="max_bad_fraction"):
        run_sft(tiny_sdxl, data, tmp_path / "strict", max_train_steps=4, max_bad_fraction=0.0)


def row_counter(dataset, max_bad_fraction: float) -> SimpleNamespace:
    """Just what Trainer._count_rows reads, on one process (the all-reduce sums over one)."""
    return SimpleNamespace(args=SimpleNamespace(max_bad_fraction=max_bad_fraction), dataset=dataset, device="cpu",
                           accelerator=SimpleNamespace(reduce=lambda t, reduction: t), counters={"bad_rows": 0, "rows_read": 0})


def test_an_epoch_counts_each_bad_row_once(tmp_path, caplog):
    """20 rows, rows 7-9 corrupt, a shuffled epoch in batches of 4: 3 bad of 20 read (15%, under 0.2), each named once."""
    from sharpening.data import EpochSampler, ImageTextDataset, collate_image_text, load_hf_dataset

    data = load_hf_dataset(None, str(write_image_folder(tmp_path / "data", count=20, size=8, corrupt=(7, 8, 9))))
    dataset = ImageTextDataset(data, "image", "text", 8, True, False, seed=0)
    dataset.max_bad_fraction = 0.2  # as the Trainer sets it from the flag
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=EpochSampler(20, seed=1), collate_fn=collate_image_text)
    counter = row_counter(dataset, 0.2)
    caplog.set_level(logging.WARNING)
    for batch in loader:
        training.Trainer._count_rows(counter, batch)
    assert counter.counters == {"bad_rows": 3, "rows_read": 20}
    named = sorted(r.getMessage().split(" (")[0] for r in caplog.records if "row" in r.getMessage())
    assert named == ["Skipping bad training row 7", "Skipping bad training row 8", "Skipping bad training row 9"]


def test_bad_fraction_stops_only_on_more_than_10_bad_rows_in_10_over_the_fraction(caplog):
    """--max_bad_fraction 0.01 on 5000 rows: judged over >= 1000 rows, so 10 bad in the first 500 go on, the 11th stops."""
    counter = row_counter(range(5000), 0.01)

    def read(bad: int, rows: int = 100) -> None:
        training.Trainer._count_rows(counter, {"captions": ["c"] * rows, "bad_rows": [f"row {i}" for i in range(bad)]})

    for _ in range(5):
        read(bad=2)
    assert counter.counters == {"bad_rows": 10, "rows_read": 500}
    with pytest.raises(RuntimeError, match=r"^11 of 600 rows read so far were unreadable \(more than --max_bad_fraction=0.01\)"):
        read(bad=1)
    counter = row_counter(range(5000), 0.01)  # past 1000 rows the share of the rows read decides: 20 of 2000 is 1%
    read(bad=0, rows=1980)
    read(bad=20, rows=20)
    assert counter.counters == {"bad_rows": 20, "rows_read": 2000}
    counter = row_counter(range(50), 0.01)  # a dataset under 1000 rows is judged over its size: 1 > 0.5
    with pytest.raises(RuntimeError, match="^1 of 4 rows"):
        read(bad=1, rows=4)
    counter = row_counter(range(5000), 0.0)  # 0: the first bad row stops
    with pytest.raises(RuntimeError, match="^1 of 100 rows"):
        read(bad=1)


def test_flow_only_flags_are_refused_for_sdxl_with_what_to_do(tiny_sdxl, tmp_path):
    data = write_image_folder(tmp_path / "data", count=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    args = rlhf.parse_args(tiny_args(tiny_sdxl, tmp_path / "w", prompt_file=prompts, dpo_target="fresh", weighting_scheme="logit_normal"))
    with pytest.raises(ValueError, match="--weighting_scheme is for flow-matching families"):
        rlhf.main(args)
    reset_accelerate_state()
    with pytest.raises(ValueError, match="--true_cfg_scale is FLUX.1's"):
        run_sft(tiny_sdxl, data, tmp_path / "t", max_train_steps=1, true_cfg_scale=3.0)
    reset_accelerate_state()
    with pytest.raises(ValueError, match="--max_sequence_length sets the T5 tokens of SD3 and FLUX.1"):
        run_sft(tiny_sdxl, data, tmp_path / "m", max_train_steps=1, max_sequence_length=77)
    reset_accelerate_state()


def test_loss_weighting_v_is_refused_for_a_model_that_already_predicts_v(tiny_sdxl, tmp_path):
    """The v weighting gives an epsilon model the v-prediction loss; on a v-prediction model it is a no-op (weight 1)."""
    data = write_image_folder(tmp_path / "data", count=2)
    with pytest.raises(ValueError, match="this model already predicts v"):
        run_sft(tiny_sdxl, data, tmp_path / "v", max_train_steps=1, loss_weighting="v", prediction_type="v_prediction")
    reset_accelerate_state()


def test_loss_weighting_v_is_refused_for_flow_models_which_already_train_the_velocity(tiny_sd3, tmp_path):
    data = write_image_folder(tmp_path / "data", count=2)
    with pytest.raises(ValueError, match="--loss_weighting v is for epsilon-prediction families"):
        run_sft(tiny_sd3, data, tmp_path / "v", max_train_steps=1, loss_weighting="v", max_sequence_length=32)
    reset_accelerate_state()
    with pytest.raises(ValueError, match="--prediction_type chooses between epsilon and v prediction"):
        run_sft(tiny_sd3, data, tmp_path / "p", max_train_steps=1, prediction_type="v_prediction", max_sequence_length=32)
    reset_accelerate_state()


def test_a_vae_with_latent_mean_and_std_is_refused(tiny_sdxl, tmp_path):
    """StableDiffusionXLPipeline decodes such a VAE's latents with latents_mean / latents_std (Playground v2.5); we do not."""
    import shutil

    from sharpening import sdxl

    model = shutil.copytree(tiny_sdxl, tmp_path / "model")
    config = json.loads((model / "vae" / "config.json").read_text())
    (model / "vae" / "config.json").write_text(json.dumps(config | {"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}))
    with pytest.raises(ValueError, match="latents_mean / latents_std"):
        sdxl.load(str(model))


def test_flags_that_would_do_nothing_are_refused_when_parsed(tiny_sdxl, tmp_path):
    """--weighting_scheme only draws fresh noise levels (RLHF --dpo_target fresh, the best-of-n control); the control
    runs no short-path exploration, and its policy gradient weighs no diffusion-loss rows."""
    from conftest import load_benchmark

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    data = write_image_folder(tmp_path / "data", count=2)
    with pytest.raises(SystemExit):
        sft.parse_args(tiny_args(tiny_sdxl, tmp_path / "o", train_data_dir=data, weighting_scheme="logit_normal"))
    with pytest.raises(SystemExit):
        rlhf.parse_args(tiny_args(tiny_sdxl, tmp_path / "o", prompt_file=prompts, logit_std=2.0))
    rlhf.parse_args(tiny_args(tiny_sdxl, tmp_path / "o", prompt_file=prompts, dpo_target="fresh", weighting_scheme="logit_normal", logit_std=2.0))
    control = load_benchmark("best_of_n_control")
    with pytest.raises(SystemExit):
        control.parse_args(tiny_args(tiny_sdxl, tmp_path / "o", prompt_file=prompts, path_reward="final"))
    with pytest.raises(SystemExit):
        control.parse_args(tiny_args(tiny_sdxl, tmp_path / "o", prompt_file=prompts, objective="ddpo", snr_gamma=5.0))
    control.parse_args(tiny_args(tiny_sdxl, tmp_path / "o", prompt_file=prompts, objective="raft", snr_gamma=5.0))


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
    ref_before = {k: v.clone() for k, v in trainer.model.reference_unet.state_dict().items()}
    policy_before = {k: v.detach().clone() for k, v in trainer.model.raw_unet.named_parameters()}
    trainer.train(rlhf.rlhf_step)
    for k, v in trainer.model.reference_unet.state_dict().items():
        assert torch.equal(v, ref_before[k]), k
    assert any(not torch.equal(v, policy_before[k]) for k, v in trainer.model.raw_unet.named_parameters())


def test_one_rlhf_update_prefers_the_winners_targets_and_starts_at_the_margin_term(tiny_sdxl, tmp_path, monkeypatch):
    """rlhf_step's own direction (the default shared target): at step 0 policy = reference, so the logits are the margin
    term alone, -gamma (R_w - R_l) / gap unit, and the loss is softplus of minus that; after one update the policy,
    relative to the frozen reference, fits the rows of the winner's target better than the loser's. Swapping winner
    and loser anywhere in the step (the errors or the rewards) fails one of the two."""
    from sharpening.losses import per_sample_mse

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    args = rlhf.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", prompt_file=prompts, max_train_steps=1, learning_rate=1e-4,
                                     reward_margin_scale=0.5))
    trainer = training.Trainer(args, rlhf.PromptDataset(rlhf.load_prompts(args)), rlhf.collate_prompts, needs_reference=True, variant="RLHF")
    recorded = {}
    pair_errors, logits_of = rlhf.pair_errors, rlhf.reward_dpo_logits
    monkeypatch.setattr(rlhf, "pair_errors", lambda tr, model, rows_w, rows_l, cond: (
        recorded.setdefault("rows", (rows_w, rows_l, cond)), pair_errors(tr, model, rows_w, rows_l, cond))[1])
    monkeypatch.setattr(rlhf, "reward_dpo_logits", lambda *a: (recorded.setdefault("logits", (a, logits_of(*a))), logits_of(*a))[1])
    seen = []
    trainer.train(lambda tr, batch, generator: seen.append(rlhf.rlhf_step(tr, batch, generator)) or seen[-1])

    (_, _, _, _, reward_w, reward_l, _, gamma), logits = recorded["logits"]
    unit = seen[0].logs["reward/gap_unit"]
    assert seen[0].trained.all() and (reward_w > reward_l).all() and gamma == 0.5
    torch.testing.assert_close(logits, -0.5 * (reward_w - reward_l), rtol=1e-5, atol=1e-7)  # the inputs are already / unit
    assert unit > 0 and torch.equal(seen[0].prompt_losses, torch.nn.functional.softplus(-logits))

    rows_w, rows_l, cond = recorded["rows"]
    with torch.no_grad():
        def gain(rows):  # the policy's error minus the reference's, per row, on the rows the loss used
            target = rows.target(trainer.sampler)
            return (per_sample_mse(trainer.predict(trainer.policy(grad=False), rows, cond), target)
                    - per_sample_mse(trainer.predict(trainer.reference, rows, cond), target))

        gain_w, gain_l = gain(rows_w), gain(rows_l)
    assert gain_w.mean() < gain_l.mean() and (gain_w != gain_l).any()


def test_rlhf_lora_holds_one_unet_and_reference_is_the_base(tiny_sdxl, tmp_path):
    import gc

    from diffusers import UNet2DConditionModel

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    args = rlhf.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", prompt_file=prompts, max_train_steps=2, use_lora=True))
    trainer = training.Trainer(args, rlhf.PromptDataset(rlhf.load_prompts(args)), rlhf.collate_prompts, needs_reference=True, variant="RLHF")
    gc.collect()
    assert trainer.model.reference_unet is None
    assert sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects()) == 1
    # With adapters disabled the model is exactly the base UNet.
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([501, 1])
    cond = trainer.conditioning(["a", "b"], trainer.default_time_ids(2))
    from sharpening.sdxl import forward

    trainer.train(rlhf.rlhf_step)
    with torch.no_grad():
        torch.testing.assert_close(trainer.reference(x, t, cond), forward(base)(x, t, cond))
        assert not torch.allclose(trainer.policy(grad=False)(x, t, cond), trainer.reference(x, t, cond))


def test_rlhf_all_tied_rewards_give_no_update(tiny_sdxl, tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    args = rlhf.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", prompt_file=prompts, max_train_steps=2, reward_model="constant"))
    trainer = training.Trainer(args, rlhf.PromptDataset(rlhf.load_prompts(args)), rlhf.collate_prompts, needs_reference=True, variant="RLHF")
    before = {k: v.detach().clone() for k, v in trainer.model.raw_unet.named_parameters()}
    caplog.set_level(logging.INFO)
    trainer.train(rlhf.rlhf_step)
    assert trainer.counters["no_preference_skips"] == 2
    assert "update skipped" in caplog.text
    for k, v in trainer.model.raw_unet.named_parameters():
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


def test_rolling_back_sets_the_newer_checkpoints_aside(tiny_sdxl, tmp_path):
    """Resuming from checkpoint-1 while checkpoint-2 and -3 exist: left in place, `latest` (the preemption marker's
    requeue) would jump back to the abandoned step 3, and pruning would delete this run's own checkpoints first."""
    from sharpening.checkpoint import list_checkpoints

    data, out = write_image_folder(tmp_path / "data", count=4), tmp_path / "out"
    run_sft(tiny_sdxl, data, out, max_train_steps=3, checkpointing_steps=1)
    run_sft(tiny_sdxl, data, out, max_train_steps=2, checkpointing_steps=1, checkpoints_total_limit=2, resume_from_checkpoint="checkpoint-1")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert sorted(p.name for p in out.glob("abandoned-*")) == ["abandoned-after-1-checkpoint-2", "abandoned-after-1-checkpoint-3"]
    assert json.loads((out / "checkpoint-2" / "training_state.json").read_text())["global_step"] == 2
    # a second rollback to the same step keeps the first abandoned branch too
    run_sft(tiny_sdxl, data, out, max_train_steps=2, checkpointing_steps=1, resume_from_checkpoint="checkpoint-1")
    assert sorted(p.name for p in out.glob("abandoned-*")) == [
        "abandoned-after-1-checkpoint-2", "abandoned-after-1-checkpoint-2-2", "abandoned-after-1-checkpoint-3"]


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


def test_the_paper_readme_script_names_run_the_same_scripts():
    """The seed's commands launch train_{sft,rlhf}_diffusion_sharpen_sdxl.py: those names run our scripts, flags and all."""
    import subprocess
    import sys

    import train_rlhf_diffusion_sharpen_sdxl as rlhf_alias
    import train_sft_diffusion_sharpen_sdxl as sft_alias

    assert (sft_alias.main, sft_alias.parse_args) == (sft.main, sft.parse_args)
    assert (rlhf_alias.main, rlhf_alias.parse_args) == (rlhf.main, rlhf.parse_args)
    root = Path(__file__).resolve().parents[1]
    shown = subprocess.run([sys.executable, "train_rlhf_diffusion_sharpen_sdxl.py", "--help"], cwd=root, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0 and "--dpo_target" in shown.stdout, shown.stderr[-2000:]


def test_a_tracked_run_leaves_no_secret_on_the_command_line(tiny_sdxl, tmp_path, monkeypatch):
    """wandb saves sys.argv in its run metadata: a tracked run masks --api_key (also as a prefix argparse accepts)
    and a base URL's user:password before the trackers start."""
    import sys

    from sharpening.config import redacted_argv

    argv = ["train.py", "--api_key", "sk-a", "--api_key=sk-b", "--api_k", "sk-c", "--base_url", "http://u:pw@host/v1",
            "--base_url=http://u:pw@host/v2", "--base_u", "http://u:pw@host/v3", "--learning_rate", "1e-5"]
    masked = ["train.py", "--api_key", "***", "--api_key=***", "--api_k", "***", "--base_url", "http://***@host/v1",
              "--base_url=http://***@host/v2", "--base_u", "http://***@host/v3", "--learning_rate", "1e-5"]
    assert redacted_argv(argv) == masked
    monkeypatch.setattr(sys, "argv", list(argv))
    sft_trainer(tiny_sdxl, tmp_path, report_to="tensorboard")
    assert sys.argv == masked


def test_a_prediction_type_override_is_exported_with_the_model(tiny_sdxl, tmp_path):
    """--prediction_type v_prediction on an epsilon base: the exported pipeline's scheduler (and a LoRA card's load
    snippet) must sample the UNet as it was trained, or its outputs are read as the wrong quantity."""
    from diffusers import StableDiffusionXLPipeline

    from sharpening import sdxl
    from sharpening.checkpoint import write_model_card

    parts = sdxl.load(str(tiny_sdxl), None, None, None)
    assert parts.scheduler_config["prediction_type"] == "epsilon"
    parts.scheduler_config["prediction_type"] = "v_prediction"  # what Trainer does with the flag
    sdxl.save_pipeline(parts, parts.unet, str(tiny_sdxl), tmp_path / "full")
    exported = StableDiffusionXLPipeline.from_pretrained(tmp_path / "full").scheduler
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl).scheduler
    assert exported.config.prediction_type == "v_prediction" and type(exported) is type(base)
    args = sft.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", train_data_dir=write_image_folder(tmp_path / "data"),
                                    use_lora=True, prediction_type="v_prediction"))
    (tmp_path / "card").mkdir()
    write_model_card(args, tmp_path / "card", "SFT", 3, "StableDiffusionXLPipeline")
    assert 'from_config(pipe.scheduler.config, prediction_type="v_prediction")' in (tmp_path / "card" / "README.md").read_text()


def test_rlhf_needs_two_candidates(tiny_sdxl, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    with pytest.raises(SystemExit):
        rlhf.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", prompt_file=prompts, num_noisy_latents=1))


def test_update_is_the_mean_over_the_trained_prompts_of_the_whole_window(tiny_sdxl, tmp_path):
    """Two micro-batches in one accumulation window, the first with one trained prompt of two, the second with two:
    the gradient is the mean over the three trained prompts, not the mean of the two micro-batch means (which
    would weigh the lone prompt twice)."""
    trainer = sft_trainer(tiny_sdxl, tmp_path, max_train_steps=1, train_batch_size=2, gradient_accumulation_steps=2, max_grad_norm=0)
    param = trainer.model.trainable_params[0]
    plan = iter([([1.0, 100.0], [True, False]), ([2.0, 3.0], [True, True])])

    def step(tr, batch, generator):
        coefs, trained = next(plan)
        return training.StepResult(torch.stack([c * param.sum() for c in coefs]), torch.tensor(trained))

    grads = []
    original_step = trainer.optimizer.step

    def capture(*a, **k):
        grads.append(param.grad.detach().clone())
        return original_step(*a, **k)

    trainer.optimizer.step = capture
    trainer.train(step)
    assert len(grads) == 1
    torch.testing.assert_close(grads[0], torch.full_like(param, (1.0 + 2.0 + 3.0) / 3))


def test_caption_dropout_uses_the_classifier_free_guidance_empty_conditioning(tiny_sdxl, tmp_path):
    from sharpening import sdxl

    trainer = sft_trainer(tiny_sdxl, tmp_path, proportion_empty_prompts=0.5)
    captions = [f"a red square {i}" for i in range(16)]
    cond = trainer.conditioning(captions, trainer.default_time_ids(16))
    generator = torch.Generator().manual_seed(3)
    dropped = trainer.caption_dropout(cond, generator)
    drop = torch.rand(16, generator=torch.Generator().manual_seed(3)) < 0.5
    assert 0 < drop.sum() < 16
    empty = sdxl.unconditional(trainer.parts, cond, trainer.device)
    for b in range(16):
        source = empty if drop[b] else cond
        torch.testing.assert_close(dropped.prompt_embeds[b], source.prompt_embeds[b], rtol=0, atol=0)
        torch.testing.assert_close(dropped.pooled[b], source.pooled[b], rtol=0, atol=0)
    assert trainer.parts.force_zeros_for_empty_prompt and dropped.pooled[drop].abs().sum() == 0


@pytest.mark.parametrize("use_lora, precision, loss_weighting",
                         [(False, "no", "none"), (True, "no", "none"), (False, "bf16", "none"), (True, "bf16", "none"), (False, "bf16", "v")])
def test_dpo_logits_without_the_margin_are_zero_before_the_first_update(tiny_sdxl, tmp_path, use_lora, precision, loss_weighting):
    """Policy and reference must run with the same numerics (and the same state weights): otherwise beta (2500) turns
    their differences into a random preference at step 0."""
    from reward import RewardOutput

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    args = rlhf.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", prompt_file=prompts, max_train_steps=1, use_lora=use_lora or None,
                                     mixed_precision=precision, reward_margin_scale=0.0, loss_weighting=loss_weighting))
    trainer = training.Trainer(args, rlhf.PromptDataset(rlhf.load_prompts(args)), rlhf.collate_prompts, needs_reference=True, variant="RLHF")
    trainer.reward.evaluate = lambda images, texts: RewardOutput(torch.arange(len(images), dtype=torch.float32), {})
    # The tiny model's fresh norm weights (1 and 0) are exact in every dtype; real ones are not.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.model.raw_unet.named_parameters():
            if "norm" in name and "lora" not in name:
                delta = torch.randn(param.shape, generator=g) * 0.1
                for model in filter(None, (trainer.model.raw_unet, trainer.model.reference_unet)):
                    model.get_parameter(name).add_(delta.to(param.dtype))
    seen = []

    def step(tr, batch, generator):
        result = rlhf.rlhf_step(tr, batch, generator)
        seen.append(result)
        return result

    trainer.train(step)
    assert seen[0].trained.all()
    assert seen[0].logs["dpo_logits"].mean == 0.0
    torch.testing.assert_close(seen[0].prompt_losses, torch.full((2,), 0.6931471805599453), rtol=0, atol=1e-7)  # log 2


@pytest.mark.parametrize("variant", ["sft", "rlhf"])
def test_trajectory_grids_and_histograms_reach_tensorboard(tiny_sdxl, tmp_path, variant):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from PIL import Image
    import io

    flags = dict(max_train_steps=3, report_to="tensorboard", log_trajectories_every=1, log_trajectories_prompts=2)
    if variant == "sft":
        trainer, step = sft_trainer(tiny_sdxl, tmp_path, **flags), sft.sft_step
    else:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red square\na blue circle\n")
        args = rlhf.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", prompt_file=prompts, **flags))
        trainer = training.Trainer(args, rlhf.PromptDataset(rlhf.load_prompts(args)), rlhf.collate_prompts, needs_reference=True, variant="RLHF")
        step = rlhf.rlhf_step
    trainer.train(step)
    events = EventAccumulator(str(next((tmp_path / "out" / "logs").rglob("events.out.tfevents*")).parent), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert {"trajectories/0", "trajectories/1"} <= set(tags["images"])
    grids = events.Images("trajectories/0")
    assert [g.step for g in grids] == [1, 2, 3]
    grid = Image.open(io.BytesIO(grids[0].encoded_image_string))
    m, n = trainer.num_steps, trainer.args.num_noisy_latents
    assert grid.width > m * 96 and grid.height > n * 96  # n candidate rows x m previews
    assert "reward_histogram/path" in tags["histograms"] and "reward_histogram/brightness" in tags["histograms"]


def test_trajectory_grids_reach_wandb_offline(tiny_sdxl, tmp_path, monkeypatch):
    """Through a list of trackers, as --report_to takes it (accelerate refused the string "tensorboard,wandb")."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = sft_trainer(tiny_sdxl, tmp_path, max_train_steps=2, report_to="tensorboard, wandb", log_trajectories_every=1,
                          log_trajectories_prompts=1)
    assert sorted(tracker.name for tracker in trainer.accelerator.trackers) == ["tensorboard", "wandb"]
    trainer.train(sft.sft_step)
    media = list(tmp_path.rglob("media/images/trajectories_*.png"))
    assert len(media) == 2, sorted(p.name for p in tmp_path.rglob("*"))[:50]
    # the offline run's record (.wandb) holds the logged histograms. wandb's service process writes that record
    # asynchronously: shut the service down (it closes its files) and give a loaded machine a moment before reading.
    import wandb

    wandb.teardown()
    deadline = time.monotonic() + 60
    while not any(b"reward_histogram/path" in f.read_bytes() for f in tmp_path.rglob("*.wandb")):
        assert time.monotonic() < deadline, sorted(str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*.wandb"))
        time.sleep(0.5)


@pytest.mark.parametrize("flags, cudnn_calls", [([], [False]), (["--cudnn_attention"], [])])
def test_cudnn_attention_is_off_on_cuda_unless_asked_for(monkeypatch, flags, cudnn_calls):
    """On CUDA the trainers turn SDPA's cuDNN backend off (its bf16 backward gave non-finite FLUX gradients on an
    H200); --cudnn_attention keeps torch's choice. Without CUDA nothing is touched."""
    from sharpening.training import configure_cuda_kernels

    calls = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", calls.append)
    args = sft.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", "y", *flags])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    configure_cuda_kernels(args)
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    configure_cuda_kernels(args)
    assert calls == cudnn_calls


def test_lora_adapters_start_from_the_seed(tiny_sdxl):
    """peft draws the gaussian lora_A from torch's global generator: seeded from --seed, two runs with one seed start
    from the same adapters whatever the process's generator holds (unseeded, each process drew its own), another seed
    from others; the global generator is left as it was."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from sharpening import sdxl
    from sharpening.policy import Policy

    def adapters(seed, global_seed):
        args = SimpleNamespace(enable_xformers_memory_efficient_attention=False, use_lora=True, lora_rank=4, lora_alpha=None,
                               seed=seed, gradient_checkpointing=False, use_ema=False)
        unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
        torch.manual_seed(global_seed)
        state = torch.random.get_rng_state()
        policy = Policy(unet, sdxl, args, SimpleNamespace(device=torch.device("cpu")), torch.float32, needs_reference=False)
        assert torch.equal(torch.random.get_rng_state(), state)
        return {k: v.detach().clone() for k, v in policy.raw_unet.named_parameters() if "lora_A" in k}

    first, again, other = adapters(0, global_seed=11), adapters(0, global_seed=12), adapters(1, global_seed=11)
    assert first and all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)


def test_sft_trains_no_prompt_whose_candidates_all_tie(tiny_sdxl, tmp_path, caplog):
    """With n >= 2 candidates that all tie there is no best path (argmax would name candidate 0, an arbitrary sample):
    no update, counted as a no-preference skip, as RLHF does. With n = 1 (ordinary fine-tuning) the lone candidate
    trains whatever its reward."""
    trainer = sft_trainer(tiny_sdxl, tmp_path / "tied", max_train_steps=2, reward_model="constant")
    before = {k: v.detach().clone() for k, v in trainer.model.raw_unet.named_parameters()}
    caplog.set_level(logging.INFO)
    trainer.train(sft.sft_step)
    assert trainer.counters["no_preference_skips"] == 2
    for k, v in trainer.model.raw_unet.named_parameters():
        assert torch.equal(v, before[k]), k
    reset_accelerate_state()

    single = sft_trainer(tiny_sdxl, tmp_path / "single", max_train_steps=1, reward_model="constant",
                         num_noisy_latents=1, trajectory_nums=1, sft_target="noise")
    before = {k: v.detach().clone() for k, v in single.model.raw_unet.named_parameters()}
    single.train(sft.sft_step)
    assert single.counters["no_preference_skips"] == 0
    assert any(not torch.equal(v, before[k]) for k, v in single.model.raw_unet.named_parameters())
    reset_accelerate_state()


def test_selection_trains_sft_only_where_there_is_a_choice():
    from sharpening.trajectory import select

    nan = float("nan")
    sel = select(torch.tensor([0.7, 0.2, nan, 0.7, 0.5, nan, 0.7, 0.9, nan]), 3)  # (n, B) = (3, 3), candidate-major
    assert sel.has_winner.tolist() == [True, True, False]
    assert sel.sft_trains.tolist() == [False, True, False] == sel.has_pair.tolist()
    assert select(torch.tensor([0.7, nan]), 1).sft_trains.tolist() == [True, False]


def test_reward_gap_unit_pools_every_prompt_explored_and_resumes(tiny_sdxl, tmp_path):
    """--reward_margin_units spread divides by the within-prompt SD pooled over the run: at batch 1 a micro-batch's
    own spread made every gap the same number (sqrt 2 at n = 2), whatever the rewards. The running sums travel
    with the checkpoint, so a resumed RLHF run ends with the same weights as an uninterrupted one."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na green triangle\n")
    args = rlhf.parse_args(tiny_args(tiny_sdxl, tmp_path / "unit", prompt_file=prompts, max_train_steps=1))
    trainer = training.Trainer(args, rlhf.PromptDataset(rlhf.load_prompts(args)), rlhf.collate_prompts, needs_reference=True, variant="RLHF")
    # n = 3 candidates (candidate-major): prompt sums of squares 2 (1, 2, 3) then 8 (0, 2, 4) -> dof 2 each.
    assert trainer.pooled_reward_spread(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(1.0)
    assert trainer.pooled_reward_spread(torch.tensor([0.0, 2.0, 4.0])) == pytest.approx((10 / 4) ** 0.5)
    assert trainer.running == {"reward_squares": pytest.approx(10.0), "reward_dof": 4}
    reset_accelerate_state()

    def run(out, **flags):
        args = rlhf.parse_args(tiny_args(tiny_sdxl, out, prompt_file=prompts, train_batch_size=1, **flags))
        rlhf.main(args)
        reset_accelerate_state()

    run(tmp_path / "straight", max_train_steps=3)
    run(tmp_path / "resumed", max_train_steps=1, checkpointing_steps=1)
    saved = json.loads((tmp_path / "resumed" / "checkpoint-1" / "training_state.json").read_text())["running"]
    assert saved["reward_dof"] == 2 and saved["reward_squares"] > 0  # one prompt's three candidates
    run(tmp_path / "resumed", max_train_steps=3, resume_from_checkpoint="latest", checkpointing_steps=100)
    straight, resumed = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "resumed")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0)


def test_a_reward_that_breaks_the_contract_fails_with_a_message():
    """A builder must return a Reward, and a reward one score per image: a bare closure failed at the first step
    with an AttributeError, a (1,) total broadcast into one score for every candidate (every update skipped)."""
    import argparse

    from rewards.base import Reward, RewardOutput
    from rewards.registry import REWARDS, build_reward
    from sharpening.trajectory import score_exploration

    REWARDS["closure-reward"] = lambda args, device, dtype: (lambda images, prompts: torch.zeros(len(images)))
    try:
        with pytest.raises(TypeError, match="must return a rewards.base.Reward"):
            build_reward("closure-reward", argparse.Namespace(reward_batch_size=8))
    finally:
        del REWARDS["closure-reward"]

    class OneScore(Reward):
        name = "one-score"

        def evaluate(self, images, prompts):
            return RewardOutput(torch.zeros(1), {})

    exploration = SimpleNamespace(scored_latents=lambda: torch.zeros(2, 3, 4, 8, 8))
    decode = lambda latents: ([None] * len(latents), torch.ones(len(latents), dtype=torch.bool))
    with pytest.raises(ValueError, match="returned total of shape \\(1,\\) for 6 images"):
        score_exploration(exploration, ["a", "b", "c"], decode, OneScore())

    # In a weighted mix the broken part is named, and its (1,) total no longer broadcasts into the mix's total.
    from rewards.base import WeightedSumReward

    class Columns(Reward):
        name = "columns"

        def evaluate(self, images, prompts):
            return RewardOutput(torch.zeros(len(images), 1), {})

    class Fine(Reward):
        name = "fine"

        def evaluate(self, images, prompts):
            return RewardOutput(torch.ones(len(images)), {"fine": torch.ones(len(images))})

    from PIL import Image

    images = [Image.new("RGB", (8, 8))] * 4
    for broken, shape in ((OneScore(), "\\(1,\\)"), (Columns(), "\\(4, 1\\)")):
        with pytest.raises(ValueError, match=f"reward '{broken.name}' returned total of shape {shape} for 4 images"):
            WeightedSumReward([(Fine(), 1.0), (broken, 0.5)]).evaluate(images, ["p"] * 4)
    assert WeightedSumReward([(Fine(), 2.0)]).evaluate(images, ["p"] * 4).total.tolist() == [2.0] * 4


def test_the_model_cards_snippet_loads_the_model_as_it_was_trained(tiny_sdxl, tmp_path, monkeypatch):
    """bf16 runs load in bf16; a LoRA's base at its revision and variant, with the VAE it was trained with; the
    output by its absolute path; a base path holding ': ' keeps the YAML front matter valid."""
    import yaml

    from sharpening.checkpoint import write_model_card

    monkeypatch.chdir(tmp_path)
    args = sft.parse_args(tiny_args(tiny_sdxl, "out", train_data_dir=write_image_folder(tmp_path / "data"), use_lora=True,
                                    mixed_precision="bf16", revision="abc123", variant="fp16",
                                    pretrained_vae_model_name_or_path="madebyollin/sdxl-vae-fp16-fix"))
    args.pretrained_model_name_or_path = "/models/sdxl: base"
    (tmp_path / "out").mkdir()
    write_model_card(args, Path("out"), "SFT", 3, "StableDiffusionXLPipeline")
    card = (tmp_path / "out" / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["base_model"] == "/models/sdxl: base"
    code = card.split("```python\n")[1].split("```")[0]
    compile(code, "card", "exec")
    assert 'revision="abc123", variant="fp16", vae=AutoencoderKL.from_pretrained("madebyollin/sdxl-vae-fp16-fix"' in code
    assert "dtype=torch.bfloat16" in code and "torch_dtype" not in code and f'load_lora_weights("{tmp_path / "out"}")' in code
    # with the guidance it was trained and validated with (diffusers' pipelines default to others: SD3's CFG is 7)
    assert code.rstrip().endswith(f'image = pipe("your prompt", height={args.resolution}, width={args.resolution}, guidance_scale=2).images[0]')
    args.true_cfg_scale, args.max_sequence_length = 4.0, 512  # FLUX.1 trained with true CFG: sampled with it too
    write_model_card(args, Path("out"), "SFT", 3, "FluxPipeline")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| true CFG scale (against the empty prompt) | 4 |" in card
    assert card.split("```python\n")[1].split("```")[0].rstrip().endswith(
        f'height={args.resolution}, width={args.resolution}, max_sequence_length=512, guidance_scale=2, true_cfg_scale=4, negative_prompt="").images[0]')


def test_the_model_card_and_trackers_get_the_precision_the_accelerator_used(tiny_sdxl, tmp_path, monkeypatch, capsys):
    """--mixed_precision left out (accelerate's config or launcher decides): the card said float16 and 'None' for an fp32
    run. fp16 on a CPU used to load the models and then fail in the UNet's first matmul."""
    from sharpening.checkpoint import write_model_card

    trainer = sft_trainer(tiny_sdxl, tmp_path)
    assert trainer.args.mixed_precision == "no" and trainer.weight_dtype == torch.float32
    write_model_card(trainer.args, tmp_path / "out", "SFT", 1, "StableDiffusionXLPipeline")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "dtype=torch.float32" in card and "| mixed precision | no |" in card
    reset_accelerate_state()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        sft.parse_args(tiny_args(tiny_sdxl, tmp_path / "o2", train_data_dir=tmp_path, mixed_precision="fp16"))
    assert "--mixed_precision fp16 needs a CUDA GPU" in capsys.readouterr().err
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch --mixed_precision fp16` sets
    with pytest.raises(ValueError, match="fp16 mixed precision needs a CUDA GPU"):
        sft_trainer(tiny_sdxl, tmp_path / "o3")
    reset_accelerate_state()
