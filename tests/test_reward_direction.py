"""Does one gradient step of a target move the reward the right way? On a problem small enough to reason about.

The "model" predicts x0_hat = mu + c * x_t from a 2-pixel latent (mu is the only parameter, c fixed), so a state's
preview depends on its noise and candidates differ. The reward is the mean pixel of the preview (a brightness).
The data image is 0. Exploration, selection, targets and losses are the package's own code.

What one SGD step does, by hand: the winner is the candidate whose noise made its previews brightest.
- the reward-seeking targets pull every state's preview toward the winner's endpoint: mu rises, and so do the
  winner's previews and everybody's;
- the `exact` targets regress every state toward the data image (0): mu falls and the reward with it, the
  failure the reward-response benchmark measured on the toy SDXL for the paper-literal targets. (Eq. 9's
  `noise` target is not checked here: how it differs from `exact` after the first DDIM step depends on the
  model, and this model is too simple to stand for a real one.)
"""
from __future__ import annotations

import pytest
import torch

from sharpening.losses import per_sample_mse, reward_dpo_logits, reward_dpo_loss
from sharpening.sampler import DDIM
from sharpening.targets import dpo_rows, per_prompt_mean, sft_rows
from sharpening.trajectory import Candidates, draw_start_indices, explore, path_reward, select
from toyworld.train_base import build_scheduler

N, B, M, C = 4, 16, 3, 0.5


class TwoPixel(torch.nn.Module):
    """epsilon-prediction of x0_hat = mu + c * x_t."""

    def __init__(self, ddim: DDIM):
        super().__init__()
        self.ddim = ddim
        self.mu = torch.nn.Parameter(torch.zeros(1, 1, 1, 2, dtype=torch.float64))

    def forward(self, x, t, cond=None):
        abar = self.ddim.alpha_bar(t).view(-1, 1, 1, 1)
        return (x - abar.sqrt() * (self.mu + C * x)) / (1 - abar).sqrt()


@pytest.fixture(scope="module")
def ddim():
    return DDIM(dict(build_scheduler().config), 20)


def explore_and_select(model, ddim, seed: int, mode: str = "sum") -> Candidates:
    """mode: --path_reward (sum: every preview scored; final: each path continued to the end, its finished image scored)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.zeros(B, 1, 1, 2, dtype=torch.float64)
    start = draw_start_indices(ddim, B, M, g).repeat(N)
    noise = torch.randn(N * B, 1, 1, 2, generator=g, dtype=torch.float64)
    exploration = explore(model, ddim, ddim.add_noise(x0.repeat(N, 1, 1, 1), noise, ddim.grid[start]), start, None, M,
                          to_end=mode == "final")
    exploration.step_rewards = exploration.scored_latents().mean(dim=(2, 3, 4)).float()  # brightness of every scored image
    rewards = path_reward(exploration.step_rewards, mode)
    return Candidates(x0, noise, exploration, rewards, select(rewards, N))


def rows_loss(model, ddim, rows) -> torch.Tensor:
    return per_prompt_mean(per_sample_mse(model(rows.states, rows.timesteps), rows.target(ddim)), rows.prompt, B)


def reward_after_one_step(ddim, loss_fn, mode: str = "sum") -> dict[str, tuple[float, float]]:
    """Before and after one SGD step on loss_fn(model, candidates), from the same noises and timesteps: the mean
    reward of every scored image (previews, or finished images with mode "final"), and the path reward of the
    candidates that had won."""
    model = TwoPixel(ddim)
    before = explore_and_select(model, ddim, seed=0, mode=mode)
    loss_fn(model, before).backward()
    with torch.no_grad():
        model.mu -= 0.05 * model.mu.grad
    after = explore_and_select(model, ddim, seed=0, mode=mode)
    winners = before.rows_of(before.selection.winner)
    return {
        "all previews": (before.exploration.step_rewards.mean().item(), after.exploration.step_rewards.mean().item()),
        "winners' paths": (before.path_rewards[winners].mean().item(), after.path_rewards[winners].mean().item()),
    }


def assert_raised(changes: dict, raised: bool = True) -> None:
    for what, (before, after) in changes.items():
        assert (after > before + 1e-3) if raised else (after < before - 1e-3), (what, before, after)


def sft_loss_fn(target):
    def loss(model, candidates):
        return rows_loss(model, model.ddim, sft_rows(target, model.ddim, candidates)).mean()

    return loss


def dpo_loss_fn(target):
    def loss(model, candidates):
        reference = TwoPixel(model.ddim).requires_grad_(False)
        rows_w, rows_l = dpo_rows(target, model.ddim, candidates, torch.Generator().manual_seed(1))
        sel = candidates.selection
        logits = reward_dpo_logits(rows_loss(model, model.ddim, rows_w), rows_loss(reference, model.ddim, rows_w),
                                   rows_loss(model, model.ddim, rows_l), rows_loss(reference, model.ddim, rows_l),
                                   sel.winner_reward.double(), sel.loser_reward.double(), beta=10.0, gamma=1.0)
        return reward_dpo_loss(logits, sel.has_pair).mean()

    return loss


@pytest.mark.parametrize("mode", ["final", "sum"])  # the SFT default scores finished images; Eq. 8 sums the previews
def test_reward_seeking_sft_target_raises_the_reward(ddim, mode):
    assert_raised(reward_after_one_step(ddim, sft_loss_fn("best_endpoint"), mode))


@pytest.mark.parametrize("target", ["shared", "fresh"])
def test_reward_seeking_dpo_targets_raise_the_reward(ddim, target):
    assert_raised(reward_after_one_step(ddim, dpo_loss_fn(target)))


def test_exact_sft_target_pulls_the_reward_back_toward_the_data(ddim):
    assert_raised(reward_after_one_step(ddim, sft_loss_fn("exact")), raised=False)


def test_exact_dpo_target_pushes_the_reward_the_wrong_way(ddim):
    assert_raised(reward_after_one_step(ddim, dpo_loss_fn("exact")), raised=False)
