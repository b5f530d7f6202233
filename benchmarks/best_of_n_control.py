#!/usr/bin/env python
"""Controls for the reward-response benchmark that learn from FINISHED images instead of short trajectories.

Per prompt: sample n complete images with the current model (DDIM over the --infer_steps grid, CFG
--guidance_scale) and score them with the reward. Then, by --objective:
- `raft` (default): fine-tune on the best one with the ordinary diffusion loss (fresh noise at m timesteps drawn
  from the whole training range), as RAFT (arXiv 2304.06767) trains. No trajectories, no previews, no reference.
- `dpo`: online Diffusion-DPO (arXiv 2311.12908) between the best and the worst of the n images: both noised with
  the same m fresh noises and timesteps, Eq. 11's logits with the frozen reference (--beta_dpo, gamma 0). This is
  the image-level preference of the upstream code's Algorithm 2 without its trajectories.
- `ddpo`: the policy gradient of DDPO (Black et al. 2023, arXiv 2305.13301) and, on flow models, Flow-GRPO (Liu
  et al. 2025, arXiv 2505.05470): the n images are sampled with a STOCHASTIC sampler (DDIM with eta =
  --noise_level; on flow models the SDE with the Euler ODE's marginals, noise scale a = --noise_level), each
  image's advantage is its reward standardised within its prompt's n images (clipped to +-`--adv_clip_max`), and
  m = --trajectory_nums of each image's sampling steps, drawn at random, are trained with -advantage x the
  step's log-likelihood. One update per sample batch, so PPO's ratio is 1 and its clipping never acts.

It tells a weak objective from a hard reward or a small budget: if this control cannot move a reward at the
benchmark's budget, neither the budget nor the model allows it; if it can and sharpening cannot, the objective
is the limit. It takes the training scripts' flags (`--num_noisy_latents` = n, `--trajectory_nums` = m rows per
prompt) and runs on the same Trainer.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reward import add_reward_args, checked_evaluate  # noqa: E402
from sharpening.losses import reward_dpo_logits, reward_dpo_loss  # noqa: E402
from sharpening.families import cfg_scale, with_guidance  # noqa: E402
from sharpening.sampler import DDIM, FlowMatchEuler, _per_sample  # noqa: E402
from sharpening.targets import fresh_rows, nonfinite_zeroed, per_prompt_mean  # noqa: E402
from sharpening.trajectory import select  # noqa: E402
from sharpening.config import add_training_args, refuse_unused_flags, validate_training_args  # noqa: E402
from sharpening.training import StepResult, Trainer  # noqa: E402
from train_rlhf_diffusion_sharpening_sdxl import load_prompts, pair_errors, preference_logs  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(parser)
    add_reward_args(parser, argv)
    parser.add_argument("--prompt_file", default=None, help="Prompts: one per line (.txt) or JSON lines (.jsonl).")
    parser.add_argument("--objective", default="raft", choices=["raft", "dpo", "ddpo"],
                        help="raft: diffusion loss on the best image; dpo: Diffusion-DPO best vs worst; ddpo: policy gradient (DDPO / Flow-GRPO).")
    parser.add_argument("--beta_dpo", type=float, default=2500.0, help="beta of the dpo objective (= Diffusion-DPO's beta / 2, as in the RLHF script).")
    parser.add_argument("--noise_level", type=float, default=1.0,
                        help="ddpo: the sampler's noise (DDIM's eta, 1 as in DDPO; the flow SDE's a, 0.7 in Flow-GRPO).")
    parser.add_argument("--adv_clip_max", type=float, default=5.0, help="ddpo: advantages are clipped to +-this (DDPO's default).")
    args = parser.parse_args(argv)
    if args.objective in ("dpo", "ddpo") and args.num_noisy_latents < 2:
        parser.error(f"--objective {args.objective} compares n images of a prompt: give --num_noisy_latents >= 2")
    if args.objective == "ddpo" and args.trajectory_nums > args.infer_steps:
        parser.error("--objective ddpo trains --trajectory_nums of each image's --infer_steps sampling steps: give --trajectory_nums <= --infer_steps")
    if args.objective == "ddpo" and args.noise_level <= 0:
        parser.error("--objective ddpo needs a stochastic sampler (a likelihood per step): give --noise_level > 0")
    refuse_unused_flags(parser, args, ["path_reward", "explore_guidance_scale", "min_start_timestep", "max_start_timestep"],
                        "they shape the trainers' short-path exploration, which this control does not run (it samples whole images)")
    if args.objective == "ddpo":
        refuse_unused_flags(parser, args, ["snr_gamma", "loss_weighting", "weighting_scheme", "logit_mean", "logit_std"],
                            "they weight or draw diffusion-loss rows; --objective ddpo trains a policy gradient on its own sampling steps")
    validate_training_args(parser, args)
    return args


def best_of_n_step(trainer: Trainer, batch: dict, generator: torch.Generator) -> StepResult:
    args, prompts = trainer.args, batch["captions"]
    n, size = args.num_noisy_latents, len(prompts)
    cond = trainer.conditioning(prompts, trainer.default_time_ids(size))
    images = trainer.rollout(cond.repeat(n), generator)  # candidate-major: row i * B + b
    decoded, finite = trainer.decode(images)
    scores = checked_evaluate(trainer.reward, decoded, prompts * n).total.float()
    scores = torch.where(finite, scores, torch.full_like(scores, float("nan")))
    sel = select(scores, n)
    pick = lambda which: images[which.to(images.device) * size + torch.arange(size, device=images.device)]  # noqa: E731
    # A prompt that does not train may hold an overflowed (NaN) image: zeroed, or backward turns every gradient NaN.
    trains = sel.has_winner if args.objective == "raft" else sel.has_pair
    rows_w = fresh_rows(trainer.sampler, pick(sel.winner), trainer.num_steps, generator).finite_where_untrained(trains)
    train_cond = trainer.caption_dropout(cond, generator)
    finite_scores = scores[torch.isfinite(scores)]
    logs = {"reward/candidate_mean": finite_scores.mean().item() if finite_scores.numel() else float("nan"),
            "reward/winner": sel.winner_reward[sel.has_winner].mean().item() if sel.has_winner.any() else float("nan")}
    if args.objective == "raft":
        prediction = trainer.predict(trainer.policy(grad=True), rows_w, train_cond)
        losses = per_prompt_mean(trainer.row_errors(prediction, rows_w), rows_w.prompt, size)
        return StepResult(losses, sel.has_winner.to(losses.device), logs)

    # Diffusion-DPO: the loser's image under the winner's noise and timesteps, policy vs frozen reference.
    rows_l = rows_w.renoised(trainer.sampler, pick(sel.loser)[rows_w.prompt]).finite_where_untrained(trains)
    policy_w, policy_l = pair_errors(trainer, trainer.policy(grad=True), rows_w, rows_l, train_cond)
    with torch.no_grad():
        ref_w, ref_l = pair_errors(trainer, trainer.reference, rows_w, rows_l, train_cond)
    zeros = torch.zeros(size, device=policy_w.device)
    logits = reward_dpo_logits(policy_w, ref_w, policy_l, ref_l, zeros, zeros, args.beta_dpo, 0.0)
    logs |= preference_logs(sel, logits, policy_w, ref_w, policy_l, ref_l)
    return StepResult(reward_dpo_loss(logits, sel.has_pair), sel.has_pair.to(logits.device), logs)


def flow_diffusion_squared(sampler, index: torch.Tensor, noise_level: float) -> torch.Tensor:
    """(N,) float64 g^2 = a^2 s / (1 - s) of the flow SDE at per-row grid `index` (Flow-GRPO's; at s = 1, where it is
    infinite, the denominator takes the next sigma)."""
    s = sampler.sigmas[index.long().cpu()]
    s_g = torch.where(s >= 1, sampler.sigmas[1], s)
    return noise_level**2 * s / (1 - s_g)  # Flow-GRPO swaps the next sigma into the denominator only


def sde_variance(sampler, index: torch.Tensor, noise_level: float) -> torch.Tensor:
    """(N,) float64 variance of sde_step's step from per-row grid `index` (it does not depend on the model). 0 on a
    deterministic step: DDIM's last one when its final alpha-bar is 1 (set_alpha_to_one)."""
    index = index.long().cpu()
    if isinstance(sampler, DDIM):
        t = sampler.grid[index]
        abar, abar_prev = sampler.alpha_bar(t), sampler.alpha_bar(t - sampler.stride)
        return noise_level**2 * (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
    if isinstance(sampler, FlowMatchEuler):
        return flow_diffusion_squared(sampler, index, noise_level) * (sampler.sigmas[index] - sampler.sigmas[index + 1])
    raise TypeError(f"--objective ddpo has no stochastic step for {type(sampler).__name__}")


def sde_step(sampler, model_output: torch.Tensor, index: torch.Tensor, sample: torch.Tensor, noise_level: float):
    """(mean, std) of the stochastic step from per-row grid `index` to index + 1 whose marginals are the
    deterministic sampler's; std is (N, 1, 1, 1). At noise_level 0 the mean is the sampler's own step.

    DDIM: DDIM's step with eta (Song et al. 2021, Eq. 12), sigma^2 = eta^2 (1 - abar_prev) / (1 - abar)
    (1 - abar / abar_prev). Flow matching (x_t = (1 - s) x0 + s eps, v = eps - x0): the reverse SDE whose
    diffusion is g = a sqrt(s / (1 - s)); its drift is v - g^2/2 times the score, the score being
    -(x + (1 - s) v) / s, so with dt = s_next - s < 0 the mean is x + [v + g^2 / (2 s) (x + (1 - s) v)] dt and the
    std g sqrt(-dt), as Flow-GRPO samples (at s = 1, where s / (1 - s) is infinite, 1 - s takes the next sigma).
    """
    index = index.long().cpu()
    var = sde_variance(sampler, index, noise_level)
    if isinstance(sampler, DDIM):
        t = sampler.grid[index]
        x0, eps = sampler.split_prediction(model_output, sample, t)
        abar_prev = sampler.alpha_bar(t - sampler.stride)
        mean = _per_sample(abar_prev.sqrt(), sample) * x0 + _per_sample((1 - abar_prev - var).clamp(min=0).sqrt(), sample) * eps
    else:
        s, s_next = sampler.sigmas[index], sampler.sigmas[index + 1]
        g2 = flow_diffusion_squared(sampler, index, noise_level)
        x, v = sample, model_output
        mean = x + (v + _per_sample(g2 / (2 * s), x) * (x + _per_sample(1 - s, x) * v)) * _per_sample(s_next - s, x)
    return mean, _per_sample(var.sqrt(), sample)


def step_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N,) Gaussian log-density of each row's step, averaged over the latent's elements (as DDPO logs it)."""
    log_density = -((x_next - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(1)


@torch.no_grad()
def sde_rollout(model, sampler, noise: torch.Tensor, cond, noise_level: float, generator: torch.Generator):
    """Sample the whole grid with sde_step. Returns (states, next_states), each (K, N, ...): step k went from
    states[k] to next_states[k]; next_states[-1] is the image."""
    x, states, nexts = noise, [], []
    for k in range(len(sampler.grid)):
        index = torch.full((x.shape[0],), k, dtype=torch.long)
        mean, std = sde_step(sampler, model(x, sampler.grid[index], cond), index, x, noise_level)
        x_next = mean + std * torch.randn(x.shape, generator=generator).to(x)
        states.append(x)
        nexts.append(x_next)
        x = x_next
    return torch.stack(states), torch.stack(nexts)


def group_advantages(scores: torch.Tensor, n: int, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(n * B,) candidate-major rewards -> (advantages (n * B,), trained (B,)): each reward standardised within its
    prompt's n images and clipped to +-clip. A prompt with an unscored image or n equal rewards has nothing to
    prefer: its advantages are 0 and it is not trained."""
    grid = scores.view(n, -1).double()
    mean, std = grid.mean(0), grid.std(0, unbiased=False)
    trained = torch.isfinite(grid).all(0) & (std > 0)
    advantages = ((grid - mean) / std.clamp(min=1e-12)).clamp(-clip, clip)
    return torch.where(trained, advantages, torch.zeros_like(advantages)).flatten().float(), trained


def ddpo_step(trainer: Trainer, batch: dict, generator: torch.Generator) -> StepResult:
    args, prompts = trainer.args, batch["captions"]
    n, size, m = args.num_noisy_latents, len(prompts), args.trajectory_nums
    sampler, scale = trainer.sampler, cfg_scale(trainer.parts, args)
    cond = trainer.conditioning(prompts, trainer.default_time_ids(size)).repeat(n)  # candidate-major: row i * B + b
    sampling = with_guidance(trainer.family, trainer.parts, trainer.policy(grad=False), cond, scale, trainer.device)
    states, nexts = sde_rollout(sampling, sampler, trainer.randn(trainer.latent_shape(n * size), generator), cond, args.noise_level, generator)
    decoded, finite = trainer.decode(nexts[-1])
    scores = checked_evaluate(trainer.reward, decoded, prompts * n).total.float()
    scores = torch.where(finite, scores, torch.full_like(scores, float("nan")))
    advantages, trained = group_advantages(scores, n, args.adv_clip_max)

    # m distinct steps of each image, uniformly among the stochastic ones (DDPO's timestep_fraction), in one call.
    stochastic = torch.nonzero(sde_variance(sampler, torch.arange(len(sampler.grid)), args.noise_level) > 0).flatten()
    if m > len(stochastic):
        raise ValueError(f"--trajectory_nums {m} > the {len(stochastic)} stochastic steps of the --infer_steps grid: lower it")
    steps = stochastic[torch.rand(n * size, len(stochastic), generator=generator).argsort(1)[:, :m].flatten()]
    image = torch.arange(n * size).repeat_interleave(m)
    rows_cond = cond.select(image)
    training = with_guidance(trainer.family, trainer.parts, trainer.policy(grad=True), rows_cond, scale, trainer.device)
    # Rows of a prompt that does not train may hold an overflowed (NaN) path: zeroed, or backward turns every gradient NaN.
    x, x_next = (nonfinite_zeroed(values[steps, image], (~trained)[image % size]) for values in (states, nexts))
    mean, std = sde_step(sampler, training(x, sampler.grid[steps], rows_cond), steps, x, args.noise_level)
    log_prob = step_log_prob(x_next, mean, std)
    # PPO's surrogate at ratio 1 (on-policy): value -advantage, gradient -advantage x grad log-likelihood.
    ratio = torch.exp(log_prob - log_prob.detach())
    row_losses = -advantages.to(ratio.device)[image] * ratio
    losses = per_prompt_mean(row_losses, image % size, size)

    finite_scores = scores[torch.isfinite(scores)]
    grid = scores.view(n, size)
    logs = {"reward/candidate_mean": finite_scores.mean().item() if finite_scores.numel() else float("nan"),
            "reward/winner": grid[:, trained].max(0).values.mean().item() if trained.any() else float("nan"),
            "ddpo/log_prob": log_prob.detach().mean().item()}
    return StepResult(losses, trained.to(losses.device), logs)


def main(args: argparse.Namespace) -> None:
    from sharpening.data import PromptDataset, collate_prompts

    trainer = Trainer(args, PromptDataset(load_prompts(args)), collate_prompts, needs_reference=args.objective == "dpo", variant=f"best-of-n control ({args.objective})")
    trainer.train(ddpo_step if args.objective == "ddpo" else best_of_n_step)


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
