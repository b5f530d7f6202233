"""Training targets: which states a variant trains on, and which clean image each state is regressed toward.

Exploration leaves, per prompt, n candidate paths of m states each, their one-step x0 previews and a ranking.
A target turns that into `Rows`: detached states x_t at timesteps t, each paired with the clean latent the
model should predict from it (`clean`) and the noise that goes with it (`noise`, the epsilon target).

Why the choice matters (measured with benchmarks/reward_response.py; README "Training targets"): when every
candidate of a prompt is a re-noising of ONE x0 (SFT's data image, RLHF's single rollout), Eq. 9's target (the
candidate's starting noise) points every state back to that same x0. Lowering the winner's error then removes
the very deviation that made its previews score well, and raising the loser's error amplifies the deviation that
made its previews score badly: the paper-literal targets push against the reward (TailorPO, arXiv 2502.01667,
shows the same for trajectory-level labels at noisy states). The reward-seeking targets below regress toward
the clean image a path PRODUCED (its last x0 preview, the "endpoint"), so that the winner and the loser differ
in what they point to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampler import Sampler
from .trajectory import Candidates

SFT_TARGETS = {
    "noise": "Eq. 9 as written: the winner's m states regressed onto its starting noise (toward the data image).",
    "exact": "the winner's m states regressed onto the data image (the noise that maps it exactly to each state).",
    "endpoint": "the winner's m states regressed onto the winner's own endpoint (its last x0 preview).",
    "best_endpoint": "the states of ALL n candidates regressed onto the winner's endpoint: every path is taught "
                     "to end where the best one did.",
}
DPO_TARGETS = {
    "noise": "Eq. 11 as written: winner and loser states regressed onto their starting noise (both toward the one x0).",
    "exact": "winner and loser states regressed onto the generated x0.",
    "endpoint": "winner states onto the winner's endpoint, loser states onto the loser's endpoint.",
    "shared": "the states of ALL n candidates, regressed onto the winner's endpoint (w) and onto the loser's "
              "endpoint (l): the same states, two outcomes, so the preference is between outcomes, not states.",
    "fresh": "Diffusion-DPO between the winner's and the loser's endpoints, noised m (--trajectory_nums) times per "
             "prompt, each with a fresh noise and timestep that both endpoints share (as Diffusion-DPO trains on image pairs).",
}


def nonfinite_zeroed(values: torch.Tensor, untrained: torch.Tensor) -> torch.Tensor:
    """`values` (N, ...) with every non-finite entry of a row whose `untrained` (N,) is True set to 0."""
    bad = untrained.to(values.device).view(-1, *[1] * (values.dim() - 1)) & ~torch.isfinite(values)
    return values.masked_fill(bad, 0.0)


@dataclass
class Rows:
    """What one regression call sees: row r is state `states[r]` at `timesteps[r]` of prompt `prompt[r]`
    (index into the micro-batch), regressed toward `clean[r]` through the epsilon target `noise[r]`."""

    states: torch.Tensor  # (R, C, H, W)
    timesteps: torch.Tensor  # (R,)
    clean: torch.Tensor  # (R, C, H, W)
    noise: torch.Tensor  # (R, C, H, W)
    prompt: torch.Tensor  # (R,) long

    def target(self, sampler: Sampler) -> torch.Tensor:
        """The model-output target (epsilon, velocity or x0, whatever the scheduler predicts)."""
        return sampler.target(self.clean, self.noise, self.timesteps)

    @staticmethod
    def cat(parts: list["Rows"]) -> "Rows":
        return Rows(*(torch.cat(field) for field in zip(*((r.states, r.timesteps, r.clean, r.noise, r.prompt) for r in parts))))

    def with_clean(self, sampler: Sampler, clean: torch.Tensor) -> "Rows":
        """The same states regressed toward other clean latents (exact noise)."""
        return Rows(self.states, self.timesteps, clean, sampler.exact_noise(clean, self.states, self.timesteps), self.prompt)

    def subset(self, keep: torch.Tensor) -> "Rows":
        """The rows where `keep` (R,) is true."""
        return Rows(*(field[keep.to(field.device)] for field in (self.states, self.timesteps, self.clean, self.noise, self.prompt)))

    def finite_where_untrained(self, trained: torch.Tensor) -> "Rows":
        """These rows with every non-finite value of a prompt that does not train (trained[prompt] False: no winner,
        no pair) set to 0. Their loss is masked out, but a NaN input (a rollout or a path that overflowed in fp16)
        would still turn every gradient NaN in backward: the mask's zero times a NaN activation is NaN."""
        untrained = ~trained.to(self.prompt.device)[self.prompt]
        if not untrained.any() or all(torch.isfinite(t).all() for t in (self.states, self.clean, self.noise)):
            return self  # the same tensors: RLHF's shared rows stay one model call
        return Rows(nonfinite_zeroed(self.states, untrained), self.timesteps, nonfinite_zeroed(self.clean, untrained),
                    nonfinite_zeroed(self.noise, untrained), self.prompt)

    def renoised(self, sampler: Sampler, clean: torch.Tensor) -> "Rows":
        """Other clean latents under the same noises and timesteps (new states): Diffusion-DPO's loser rows."""
        return Rows(sampler.add_noise(clean, self.noise, self.timesteps), self.timesteps, clean, self.noise, self.prompt)


def path_rows(sampler: Sampler, candidates: Candidates, which: torch.Tensor, clean: torch.Tensor | None) -> Rows:
    """The m states of candidate which[b] of every prompt b (rows step-major: state k of prompt b is row k*B + b).
    clean: (B, C, H, W) per prompt, regressed to exactly; None = the paper's target (the starting noise, toward x0)."""
    rows = candidates.rows_of(which)
    m, batch = candidates.exploration.timesteps.shape[0], len(which)
    states = candidates.exploration.states[:, rows].flatten(0, 1)
    timesteps = candidates.exploration.timesteps[:, rows].flatten(0, 1)
    prompt = torch.arange(batch).repeat(m)
    if clean is None:
        return Rows(states, timesteps, candidates.x0[prompt], candidates.noise[rows].repeat(m, 1, 1, 1), prompt)
    clean = clean[prompt].to(states)
    return Rows(states, timesteps, clean, sampler.exact_noise(clean, states, timesteps), prompt)


def all_paths_rows(sampler: Sampler, candidates: Candidates, clean: torch.Tensor, trained: torch.Tensor) -> Rows:
    """The m states of ALL n candidates of every prompt, each regressed toward its prompt's `clean` (B, C, H, W).
    A candidate whose path could not be scored (a NaN reward: e.g. a path that overflowed in fp16) is left out of a
    prompt that trains (`trained`, (B,) bool): its states would make that prompt's loss, and so the whole update,
    non-finite."""
    batch = len(clean)
    n = candidates.exploration.timesteps.shape[1] // batch
    scored = torch.isfinite(candidates.path_rewards).view(n, batch).cpu()
    untrained = ~trained.cpu()  # kept, and masked out of the loss, as every untrained prompt
    parts = []
    for i in range(n):
        rows = path_rows(sampler, candidates, torch.full((batch,), i), clean)
        parts.append(rows.subset((scored[i] | untrained)[rows.prompt]))
    return Rows.cat(parts)


def finite_pair_where_untrained(rows_w: Rows, rows_l: Rows, trained: torch.Tensor) -> tuple[Rows, Rows]:
    """Rows.finite_where_untrained for a DPO pair; rows that shared their states still do (one model call)."""
    clean_w, clean_l = rows_w.finite_where_untrained(trained), rows_l.finite_where_untrained(trained)
    if rows_l.states is rows_w.states and clean_l.states is not clean_w.states:
        clean_l = Rows(clean_w.states, clean_l.timesteps, clean_l.clean, clean_l.noise, clean_l.prompt)
    return clean_w, clean_l


def fresh_rows(sampler: Sampler, clean: torch.Tensor, per_prompt: int, generator: torch.Generator) -> Rows:
    """`per_prompt` fresh noisings of each prompt's `clean` at timesteps drawn uniformly from the training range,
    as the ordinary diffusion loss (and Diffusion-DPO) sees its data."""
    batch = clean.shape[0]
    prompt = torch.arange(batch).repeat(per_prompt)
    timesteps = sampler.draw_train_timesteps(len(prompt), generator)
    noise = torch.randn((len(prompt), *clean.shape[1:]), generator=generator).to(clean)
    return Rows(sampler.add_noise(clean[prompt], noise, timesteps), timesteps, clean[prompt], noise, prompt)


def sft_rows(name: str, sampler: Sampler, candidates: Candidates) -> Rows:
    """Rows of the SFT loss (Algorithm 1, line 9) for target `name` (SFT_TARGETS). A prompt SFT does not train
    (Selection.sft_trains: no scored candidate, or all tie) keeps its rows (its loss is masked out) with their
    non-finite inputs zeroed (Rows.finite_where_untrained)."""
    winner, trained = candidates.selection.winner, candidates.selection.sft_trains
    if name == "noise":
        rows = path_rows(sampler, candidates, winner, None)
    elif name == "exact":
        rows = path_rows(sampler, candidates, winner, candidates.x0)
    elif name == "endpoint":
        rows = path_rows(sampler, candidates, winner, candidates.endpoints_of(winner))
    elif name == "best_endpoint":
        rows = all_paths_rows(sampler, candidates, candidates.endpoints_of(winner), trained)
    else:
        raise ValueError(f"unknown SFT target {name!r}; choose from {sorted(SFT_TARGETS)}")
    return rows.finite_where_untrained(trained)


def dpo_rows(name: str, sampler: Sampler, candidates: Candidates, generator: torch.Generator) -> tuple[Rows, Rows]:
    """(winner rows, loser rows) of the DPO loss (Eq. 11) for target `name` (DPO_TARGETS); the two sides have
    the same number of rows per prompt. A prompt without a pair keeps its rows (its loss is masked out) with their
    non-finite inputs zeroed."""
    sel = candidates.selection
    if name in ("noise", "exact", "endpoint"):
        def side(which):
            clean = {"noise": None, "exact": candidates.x0, "endpoint": candidates.endpoints_of(which)}[name]
            return path_rows(sampler, candidates, which, clean)

        rows_w, rows_l = side(sel.winner), side(sel.loser)
    elif name == "shared":
        rows_w = all_paths_rows(sampler, candidates, candidates.endpoints_of(sel.winner), sel.has_pair)
        rows_l = rows_w.with_clean(sampler, candidates.endpoints_of(sel.loser)[rows_w.prompt])
    elif name == "fresh":
        m = candidates.exploration.timesteps.shape[0]
        rows_w = fresh_rows(sampler, candidates.endpoints_of(sel.winner), m, generator)
        rows_l = rows_w.renoised(sampler, candidates.endpoints_of(sel.loser)[rows_w.prompt])
    else:
        raise ValueError(f"unknown DPO target {name!r}; choose from {sorted(DPO_TARGETS)}")
    return finite_pair_where_untrained(rows_w, rows_l, sel.has_pair)


def per_prompt_mean(values: torch.Tensor, prompt: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """(R,) row values -> (num_prompts,) mean over each prompt's rows."""
    prompt = prompt.to(values.device)
    sums = torch.zeros(num_prompts, dtype=values.dtype, device=values.device).index_add(0, prompt, values)
    counts = torch.bincount(prompt, minlength=num_prompts).clamp(min=1).to(values.dtype)
    return sums / counts
