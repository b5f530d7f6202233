"""benchmarks/best_of_n_control.py: the finished-image controls of the reward-response benchmark."""
from __future__ import annotations

import pytest
import torch

from conftest import load_benchmark, tiny_args

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_image_level_dpo_starts_at_log_2_and_one_update_prefers_the_best_image(tiny_sdxl, tmp_path):
    """--objective dpo: policy = reference at step 0 (logits 0, loss log 2 for every prompt); after one update the
    policy, relative to the reference, denoises the noisings of the best-scored generation better than those of the
    worst one (checked on the recorded rows, with winner and loser identified by the test's own reward)."""
    from reward import RewardOutput
    from sharpening.data import PromptDataset, collate_prompts
    from sharpening.losses import per_sample_mse
    from sharpening.training import Trainer

    control = load_benchmark("best_of_n_control")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    args = control.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", prompt_file=prompts, max_train_steps=1, objective="dpo",
                                        proportion_empty_prompts=0.0))
    trainer = Trainer(args, PromptDataset(control.load_prompts(args)), collate_prompts, needs_reference=True, variant="test")
    n, size = args.num_noisy_latents, 2
    # Candidate i of every prompt scores i: the last candidate is the best, the first the worst.
    trainer.reward.evaluate = lambda images, texts: RewardOutput(torch.arange(len(images), dtype=torch.float32) // size, {})
    recorded = {}
    rollout, predict = trainer.rollout, trainer.predict
    trainer.rollout = lambda cond, generator: recorded.setdefault("images", rollout(cond, generator))
    trainer.predict = lambda model, rows, cond: (recorded.setdefault("rows", (rows, cond)), predict(model, rows, cond))[1]
    seen = []
    trainer.train(lambda tr, batch, generator: seen.append(control.best_of_n_step(tr, batch, generator)) or seen[-1])

    first = seen[0]
    assert first.trained.all() and first.logs["skipped_prompts"] == 0
    assert first.logs["dpo_logits"] == 0.0
    torch.testing.assert_close(first.prompt_losses, torch.full((2,), 0.6931471805599453), rtol=0, atol=1e-7)

    rows, cond = recorded["rows"]
    images = recorded["images"]
    with torch.no_grad():
        target = rows.target(trainer.sampler)
        gain = (per_sample_mse(predict(trainer.policy(grad=False), rows, cond), target)
                - per_sample_mse(predict(trainer.reference, rows, cond), target))  # policy error - reference error
    for b in range(size):
        best = (rows.clean == images[(n - 1) * size + b]).flatten(1).all(1)
        worst = (rows.clean == images[b]).flatten(1).all(1)
        assert best.sum() == worst.sum() == args.trajectory_nums
        assert gain[best].mean() < gain[worst].mean()


def test_image_level_dpo_needs_two_candidates(tiny_sdxl, tmp_path):
    control = load_benchmark("best_of_n_control")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    with pytest.raises(SystemExit):
        control.parse_args(tiny_args(tiny_sdxl, tmp_path / "out", prompt_file=prompts, objective="dpo", num_noisy_latents=1))
