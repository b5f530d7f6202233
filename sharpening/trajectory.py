"""Exploration shared by both variants: n candidates x m sampler steps without grad, scored along the path.

Layout convention: the n candidates of a micro-batch of B prompts are stacked candidate-major, so row
i * B + b is candidate i of prompt b and `x.view(n, B, ...)` recovers the (candidate, prompt) grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from rewards.base import checked_evaluate

from .sampler import ModelFn, Sampler, on_rows


def draw_start_indices(sampler: Sampler, batch_size: int, num_steps: int, generator: torch.Generator, first: int = 0,
                       last: int | None = None) -> torch.Tensor:
    """Per-prompt start positions drawn uniformly from the grid indices in [first, last] that leave room for
    `num_steps` states on the grid (the upstream release, Gen-Verse/Diffusion-Sharpening
    train_sft_diffusion_sharpen_sdxl.py L1050, shares one t across ranks, their maximum: biased toward high noise)."""
    last_start = last_legal_start(sampler, num_steps, last)
    if first > last_start:
        raise ValueError(f"no start position in grid indices [{first}, {last}] leaves room for {num_steps} steps on a grid of {len(sampler.grid)}")
    return torch.randint(first, last_start + 1, (batch_size,), generator=generator)


def last_legal_start(sampler: Sampler, num_steps: int, last: int | None = None) -> int:
    """The last grid index a path of `num_steps` states can start at and stay on the grid, capped at `last`."""
    room = len(sampler.grid) - num_steps
    return room if last is None else min(last, room)


def first_start_index(sampler: Sampler, max_start_timestep: float | None) -> int:
    """The first grid index whose timestep is <= max_start_timestep (0 when None: the whole grid)."""
    if max_start_timestep is None:
        return 0
    later = (sampler.grid.double() <= max_start_timestep).nonzero()
    return int(later[0]) if len(later) else len(sampler.grid)


def last_start_index(sampler: Sampler, min_start_timestep: float | None) -> int | None:
    """The last grid index whose timestep is >= min_start_timestep (None when None: no limit; -1 when no index is)."""
    if min_start_timestep is None:
        return None
    earlier = (sampler.grid.double() >= min_start_timestep).nonzero()
    return int(earlier[-1]) if len(earlier) else -1


def effective_steps(sampler: Sampler, trajectory_nums: int) -> int:
    """m clipped to the grid length, so every visited state is on the grid."""
    return max(1, min(trajectory_nums, len(sampler.grid)))


@dataclass
class Exploration:
    states: torch.Tensor  # (m, N, C, H, W): x_{t_k}, the inputs of the k-th UNet call
    timesteps: torch.Tensor  # (m, N)
    x0_preds: torch.Tensor  # (m, N, C, H, W): one-step x0 prediction at each state (what the reward sees)
    step_rewards: torch.Tensor | None = None  # (m, N), NaN where the reward could not be had
    step_components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (m, N)
    images: list | None = None  # the decoded images the reward saw (scored-major: k * N + row), for the trajectory grids
    finished: torch.Tensor | None = None  # (N, C, H, W): where each path ends when continued to the end of the grid

    def scored_latents(self) -> torch.Tensor:
        """(k, N, C, H, W): what the reward scores. The m previews, or (--path_reward final) each path's finished image."""
        return self.x0_preds if self.finished is None else self.finished.unsqueeze(0)


@torch.no_grad()
def explore(model: ModelFn, sampler: Sampler, x_start: torch.Tensor, start: torch.Tensor, cond, num_steps: int,
            to_end: bool = False) -> Exploration:
    """Run `num_steps` deterministic sampler steps from x_start (N rows, per-row grid index `start`), keeping each state.
    to_end: then continue every row with the same sampler to the end of the grid (states not kept) and record the
    image each path finishes at (`Exploration.finished`)."""
    states, timesteps, x0_preds = [], [], []
    x, index = x_start, start.long()
    for _ in range(num_steps):
        t = sampler.grid[index]
        states.append(x)
        timesteps.append(t)
        x, x0 = sampler.step(model(x, t, cond), index, x)
        x0_preds.append(x0)
        index = index + 1
    exploration = Exploration(torch.stack(states), torch.stack(timesteps), torch.stack(x0_preds))
    if to_end:
        exploration.finished = finish(model, sampler, x, index, cond, x0_preds[-1])
    return exploration


@torch.no_grad()
def finish(model: ModelFn, sampler: Sampler, x: torch.Tensor, index: torch.Tensor, cond, last_x0: torch.Tensor) -> torch.Tensor:
    """Continue each row from grid `index` (per row; len(grid) = already at the end) to the end of the grid and return
    its last x0 prediction, the image the path finishes at (`last_x0` for rows already at the end). Each step runs
    only the rows still on the grid, in one call (paths start at different grid positions, so about half the rows
    of a batch have ended on average by the time the last one does)."""
    size = len(sampler.grid)
    x, finished, index = x.clone(), last_x0.clone(), index.clone()
    while len(rows := (index < size).nonzero().squeeze(1)):
        at, on_device = index[rows], rows.to(x.device)
        out = on_rows(model, rows)(x[on_device], sampler.grid[at], cond.select(rows) if cond is not None else None)
        x[on_device], finished[on_device] = sampler.step(out, at, x[on_device])
        index[rows] += 1
    return finished


def score_exploration(exploration: Exploration, prompts: list[str], decode: Callable, reward) -> None:
    """Decode what the exploration is scored on (every x0 preview, or each path's finished image) and score all of
    them in ONE reward call (so an MLLM grader runs them concurrently). `prompts` holds the real caption of each of
    the N rows. `decode(latents) -> (images, finite)`: an image that did not decode to finite pixels scores NaN."""
    scored = exploration.scored_latents()
    m, N = scored.shape[:2]
    images, finite = decode(scored.flatten(0, 1))
    result = checked_evaluate(reward, images, prompts * m)

    def grid(values: torch.Tensor) -> torch.Tensor:
        values = values.float().cpu()
        return torch.where(finite, values, torch.full_like(values, float("nan"))).view(m, N)

    exploration.images = images
    exploration.step_rewards = grid(result.total)
    exploration.step_components = {k: grid(v) for k, v in result.components.items()}


def path_reward(step_rewards: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """Eq. 8: R_i = sum over the visited states (or the mean). One unscored state makes the path NaN,
    so an incompletely scored candidate can never win. "final": the reward of the one scored image, the path's
    finished image (exploration ran `to_end`)."""
    if mode == "sum":
        return step_rewards.sum(0)
    if mode == "mean":
        return step_rewards.mean(0)
    if mode == "final":
        if step_rewards.shape[0] != 1:
            raise ValueError("--path_reward final scores one finished image per path; explore with to_end=True")
        return step_rewards[0]
    raise ValueError(f"--path_reward must be 'sum', 'mean' or 'final', got {mode!r}")


@dataclass
class Selection:
    winner: torch.Tensor  # (B,) candidate index of the best path per prompt
    loser: torch.Tensor  # (B,) candidate index of the worst path per prompt
    has_winner: torch.Tensor  # (B,) bool: at least one candidate has a finite path reward
    has_pair: torch.Tensor  # (B,) bool: best and worst are finite and differ (a preference exists)
    winner_reward: torch.Tensor  # (B,)
    loser_reward: torch.Tensor  # (B,)
    # (B,) bool, the prompts SFT trains: with several candidates those with a choice (has_pair): where they all tie,
    # argmax names candidate 0, an arbitrary sample, and training toward it would be self-distillation without reward
    # evidence. With one candidate (n = 1: ordinary fine-tuning, no choice to make) every scored prompt.
    sft_trains: torch.Tensor


def select(path_rewards: torch.Tensor, num_candidates: int) -> Selection:
    """Per prompt (reduce over the n axis, not over the flattened batch as the upstream release does, which
    trains one prompt per batch): argmax and argmin
    of the path reward among candidates with a finite reward."""
    grid = path_rewards.view(num_candidates, -1).float()
    finite = torch.isfinite(grid)
    winner = grid.masked_fill(~finite, float("-inf")).argmax(0)
    loser = grid.masked_fill(~finite, float("inf")).argmin(0)
    has_winner = finite.any(0)
    idx = torch.arange(grid.shape[1])
    winner_reward, loser_reward = grid[winner, idx], grid[loser, idx]
    has_pair = has_winner & (winner_reward > loser_reward)
    sft_trains = has_winner if num_candidates == 1 else has_pair
    return Selection(winner, loser, has_winner, has_pair, winner_reward, loser_reward, sft_trains)


def within_prompt_squares(path_rewards: torch.Tensor, num_candidates: int) -> tuple[float, int]:
    """The sum of squared deviations of the path rewards from their prompt's mean, over a micro-batch's prompts, and
    its degrees of freedom (scored candidates less one per prompt): the parts of a pooled within-prompt variance."""
    grid = path_rewards.view(num_candidates, -1).double()
    finite = torch.isfinite(grid)
    counts = finite.sum(0)
    means = torch.where(finite, grid, torch.zeros_like(grid)).sum(0) / counts.clamp(min=1)
    squares = torch.where(finite, (grid - means) ** 2, torch.zeros_like(grid)).sum()
    return float(squares), int((counts - 1).clamp(min=0).sum())



@dataclass
class Candidates:
    """What exploration hands to a variant's loss: n candidates per prompt, scored and ranked."""

    x0: torch.Tensor  # (B, C, H, W) the clean latent trajectories start from
    noise: torch.Tensor  # (n*B, C, H, W) the noise each candidate was started with
    exploration: Exploration
    path_rewards: torch.Tensor  # (n*B,)
    selection: Selection

    def rows_of(self, which: torch.Tensor) -> torch.Tensor:
        """Candidate-major row of candidate which[b] of prompt b, for (B,) indices such as the winners."""
        batch = self.selection.winner.shape[0]
        return which.cpu() * batch + torch.arange(batch)

    def endpoints_of(self, which: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W): where candidate which[b] of prompt b ended: its last one-step x0 preview, or its finished
        image when the exploration ran to the end of the grid (the last image the reward scored on that path)."""
        return self.exploration.scored_latents()[-1, self.rows_of(which)]
