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
    assert first.logs["dpo_logits"].mean == 0.0
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


# ------------------------------------------------------------------------------------------------ --objective ddpo
def _ddim_sampler(steps: int):
    from sharpening.sampler import DDIM

    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "epsilon"}
    return DDIM(config, steps)


def _flow_sampler(steps: int, shift: float = 3.0):
    from sharpening.sampler import FlowMatchEuler

    return FlowMatchEuler({"num_train_timesteps": 1000, "shift": shift}, steps)


@pytest.mark.parametrize("make", [_ddim_sampler, _flow_sampler])
def test_sde_step_without_noise_is_the_sampler_step(make):
    control = load_benchmark("best_of_n_control")
    sampler = make(10)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(10, 4, 3, 3, generator=g), torch.randn(10, 4, 3, 3, generator=g)
    index = torch.arange(10)
    mean, std = control.sde_step(sampler, out, index, x, 0.0)
    torch.testing.assert_close(mean, sampler.step(out, index, x)[0], rtol=1e-5, atol=1e-5)
    assert (std == 0).all()
    _, std = control.sde_step(sampler, out, index, x, 1.0)
    assert std.shape == (10, 1, 1, 1) and (std[:-1] > 0).all()
    # The last step: DDIM ends at alpha-bar 1 (set_alpha_to_one), deterministic; the flow SDE still adds noise.
    assert (std[-1] == 0).all() if make is _ddim_sampler else (std[-1] > 0).all()


@pytest.mark.parametrize("make, noise_level, tolerance", [(_ddim_sampler, 1.0, 0.02), (_flow_sampler, 0.7, 0.05)])
def test_stochastic_sampling_keeps_the_marginals(make, noise_level, tolerance):
    """With the exact model of a point mass x0 = 2 the states at every grid point must have the forward process's
    marginal: mean sqrt(abar) x0 and std sqrt(1 - abar) (DDIM, exact by construction), mean (1 - s) x0 and std s
    (flow; Euler-Maruyama, exact to first order in the step: a finer grid, and only down to s = 0.1, below which
    the relative error grows as the step nears s; it shrinks with the grid, measured 5 % at s = 0.05 with 200
    steps, 1.4 % at s = 0.06 with 800). A sign or factor slip in the SDE's
    drift or noise shows here as a drifting variance."""
    from sharpening.sampler import DDIM

    control = load_benchmark("best_of_n_control")
    sampler = make(20 if make is _ddim_sampler else 200)
    x0 = 2.0

    def level(t):  # (signal scale, noise scale) at model timesteps t
        if isinstance(sampler, DDIM):
            abar = sampler.alpha_bar(t).float().view(-1, 1, 1, 1)
            return abar.sqrt(), (1 - abar).sqrt()
        s = sampler.sigma(t).float().view(-1, 1, 1, 1)
        return 1 - s, s

    def exact_model(x, t, cond):
        a, s = level(t)
        eps = (x - a * x0) / s
        return eps if isinstance(sampler, DDIM) else eps - x0

    g = torch.Generator().manual_seed(0)
    a, s = level(sampler.grid[:1])  # start from the exact marginal (DDIM's grid starts at t = 951, not at pure noise)
    start = a * x0 + s * torch.randn(20000, 1, 1, 1, generator=g)
    states, _ = control.sde_rollout(exact_model, sampler, start, None, noise_level, g)
    for k in range(1, len(sampler.grid)):
        a, s = level(sampler.grid[k : k + 1])
        if s.item() < 0.1:
            continue
        assert abs(states[k].mean() - a.item() * x0) < tolerance * max(1.0, a.item() * x0), k
        assert abs(states[k].std() / s.item() - 1) < tolerance, k


def test_group_advantages_standardise_within_each_prompt():
    control = load_benchmark("best_of_n_control")
    # n = 3 candidates of B = 3 prompts, candidate-major; prompt 1 has a tie, prompt 2 an unscored image.
    scores = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, float("nan"), 5.0, 1.0, 2.0])
    advantages, trained = control.group_advantages(scores, 3, clip=5.0)
    assert trained.tolist() == [True, False, False]
    sd = (14 / 3) ** 0.5  # population std of 0, 1, 5: deviations -2, -1, 3
    torch.testing.assert_close(advantages.view(3, 3)[:, 0], torch.tensor([-2 / sd, -1 / sd, 3 / sd]))
    assert (advantages.view(3, 3)[:, 1:] == 0).all()
    clipped, _ = control.group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), 4, clip=1.0)
    torch.testing.assert_close(clipped, torch.tensor([-0.5774, -0.5774, -0.5774, 1.0]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["tiny_sdxl", "tiny_sd3"])
def test_ddpo_update_makes_the_best_image_more_likely_than_the_worst(family, request, tmp_path):
    """One update of --objective ddpo (every stochastic step of each image trained: 3 of the 4-step grid on the
    SDXL twin, whose last DDIM step is deterministic; 3 of 4 on SD3's too): the loss starts at -mean advantage = 0
    per prompt, and afterwards the policy's log-likelihood of the best-scored image's sampling steps rose relative
    to the worst one's (winner and loser by the test's own reward)."""
    from reward import RewardOutput
    from sharpening.data import PromptDataset, collate_prompts
    from sharpening.families import with_guidance
    from sharpening.training import Trainer

    control = load_benchmark("best_of_n_control")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    args = control.parse_args(tiny_args(request.getfixturevalue(family), tmp_path / "out", prompt_file=prompts, max_train_steps=1,
                                        objective="ddpo", trajectory_nums=3, learning_rate=1e-4, proportion_empty_prompts=0.0))
    trainer = Trainer(args, PromptDataset(control.load_prompts(args)), collate_prompts, needs_reference=False, variant="test")
    n, size, sampler = args.num_noisy_latents, 2, trainer.sampler
    trainer.reward.evaluate = lambda images, texts: RewardOutput(torch.arange(len(images), dtype=torch.float32) // size, {})

    @torch.no_grad()
    def log_likelihood(cond, states, nexts):  # (n * B,) the policy's log-likelihood of each image's stochastic steps
        guided = with_guidance(trainer.family, trainer.parts, trainer.policy(grad=False), cond, args.guidance_scale, trainer.device)
        total = torch.zeros(n * size)
        for k in range(len(sampler.grid)):
            index = torch.full((n * size,), k, dtype=torch.long)
            if (control.sde_variance(sampler, index, args.noise_level) == 0).all():
                continue
            mean, std = control.sde_step(sampler, guided(states[k], sampler.grid[index], cond), index, states[k], args.noise_level)
            total += control.step_log_prob(nexts[k], mean, std).cpu()
        return total

    recorded = {}
    rollout = control.sde_rollout

    def recording_rollout(model, sampler_, noise, cond, level, generator):
        states, nexts = rollout(model, sampler_, noise, cond, level, generator)
        recorded.update(cond=cond, states=states, nexts=nexts, before=log_likelihood(cond, states, nexts))
        return states, nexts

    control.sde_rollout = recording_rollout
    seen = []
    trainer.train(lambda tr, batch, generator: seen.append(control.ddpo_step(tr, batch, generator)) or seen[-1])
    assert seen[0].trained.all()
    torch.testing.assert_close(seen[0].prompt_losses, torch.zeros(size), rtol=0, atol=1e-6)

    gain = (log_likelihood(recorded["cond"], recorded["states"], recorded["nexts"]) - recorded["before"]).view(n, size)
    assert (gain[n - 1] > gain[0]).all(), gain  # candidate n - 1 scored best, candidate 0 worst, in every prompt


def test_sde_step_at_eta_1_is_diffusers_ddim_step_with_the_same_noise():
    """DDPO samples DDIMScheduler.step(eta=1): the mean and std here, with the noise z it draws, give its prev_sample at
    every step (the marginal test above cannot see a wrong variance: any variance up to 1 - abar_prev keeps them)."""
    from diffusers import DDIMScheduler

    control = load_benchmark("best_of_n_control")
    sampler = _ddim_sampler(20)
    scheduler = DDIMScheduler.from_config(sampler.scheduler.config)
    scheduler.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    for k, t in enumerate(scheduler.timesteps):
        x, out, z = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
        mean, std = control.sde_step(sampler, out, torch.full((2,), k), x, 1.0)
        expected = scheduler.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
        torch.testing.assert_close(mean + std * z, expected, rtol=0, atol=2e-6)


def test_flow_sde_step_is_flow_grpos():
    """Flow-GRPO's SDE step (its sd3_sde_with_logprob): std_dev = a sqrt(s / (1 - s')) with s' = the next sigma where
    s = 1, mean = x (1 + std_dev^2 dt / (2 s)) + v (1 + std_dev^2 (1 - s) / (2 s)) dt, std = std_dev sqrt(-dt)."""
    control = load_benchmark("best_of_n_control")
    sampler, a = _flow_sampler(10, shift=1.0), 0.7
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(10, 4, 3, 3, generator=g).double(), torch.randn(10, 4, 3, 3, generator=g).double()
    index = torch.arange(10)
    mean, std = control.sde_step(sampler, v, index, x, a)
    s, s_next = sampler.sigmas[:-1].view(-1, 1, 1, 1), sampler.sigmas[1:].view(-1, 1, 1, 1)
    std_dev = a * (s / (1 - torch.where(s == 1, sampler.sigmas[1], s))).sqrt()
    dt = s_next - s
    torch.testing.assert_close(mean, x * (1 + std_dev**2 / (2 * s) * dt) + v * (1 + std_dev**2 * (1 - s) / (2 * s)) * dt)
    torch.testing.assert_close(std, std_dev * (-dt).sqrt())


def _control_trainer(control, model, tmp_path, **flags):
    from reward import RewardOutput
    from sharpening.data import PromptDataset, collate_prompts
    from sharpening.training import Trainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    args = control.parse_args(tiny_args(model, tmp_path / "out", prompt_file=prompts, max_train_steps=1,
                                        proportion_empty_prompts=0.0, **flags))
    trainer = Trainer(args, PromptDataset(control.load_prompts(args)), collate_prompts,
                      needs_reference=flags.get("objective") == "dpo", variant="test")
    # Candidate i of every prompt scores i: the last candidate is the best, the first the worst (undecodable images
    # score NaN in the step itself).
    trainer.reward.evaluate = lambda images, texts: RewardOutput(torch.arange(len(images), dtype=torch.float32) // 2, {})
    return trainer


def test_raft_trains_toward_the_best_image(tiny_sdxl, tmp_path):
    """The default control (RAFT): after one update the policy denoises noisings of the best-scored generation better,
    relative to before, than the same noisings of the worst one."""
    from sharpening.losses import per_sample_mse

    control = load_benchmark("best_of_n_control")
    trainer = _control_trainer(control, tiny_sdxl, tmp_path, objective="raft", learning_rate=1e-4)
    n, size = trainer.args.num_noisy_latents, 2
    recorded = {}
    rollout, predict = trainer.rollout, trainer.predict
    trainer.rollout = lambda cond, generator: recorded.setdefault("images", rollout(cond, generator))

    def recording_predict(model, rows, cond):
        if "rows" not in recorded:
            worst = rows.renoised(trainer.sampler, recorded["images"][:size][rows.prompt])
            with torch.no_grad():
                before = [per_sample_mse(predict(model, r, cond), r.target(trainer.sampler)) for r in (rows, worst)]
            recorded.update(rows=(rows, worst, cond), before=before)
        return predict(model, rows, cond)

    trainer.predict = recording_predict
    seen = []
    trainer.train(lambda tr, batch, generator: seen.append(control.best_of_n_step(tr, batch, generator)) or seen[-1])
    assert seen[0].trained.all()
    best, worst, cond = recorded["rows"]
    assert (best.clean == recorded["images"][(n - 1) * size:][best.prompt]).all()  # it trained on the best images
    with torch.no_grad():
        after = [per_sample_mse(predict(trainer.policy(grad=False), r, cond), r.target(trainer.sampler)) for r in (best, worst)]
    gain_best, gain_worst = (a - b for a, b in zip(after, recorded["before"]))
    assert gain_best.mean() < gain_worst.mean() and gain_best.mean() < 0


@pytest.mark.parametrize("objective", ["raft", "dpo", "ddpo"])
def test_an_overflowed_prompt_does_not_cancel_the_others_update(tiny_sdxl, tmp_path, objective):
    """Prompt 0's generations overflow (NaN): it does not train, and prompt 1 still updates the model (its NaN
    activations used to turn every gradient NaN, so the whole update was skipped as non-finite)."""
    control = load_benchmark("best_of_n_control")
    trainer = _control_trainer(control, tiny_sdxl, tmp_path, objective=objective, trajectory_nums=2)
    size = 2
    if objective == "ddpo":  # (steps, candidate-major rows, ...): prompt 0's rows are 0, 2, 4
        rollout = control.sde_rollout
        control.sde_rollout = lambda *args: tuple(t.index_fill(1, torch.arange(0, t.shape[1], size), float("nan")) for t in rollout(*args))
        step = control.ddpo_step
    else:
        rollout = trainer.rollout
        trainer.rollout = lambda cond, generator: (lambda t: t.index_fill(0, torch.arange(0, len(t), size), float("nan")))(rollout(cond, generator))
        step = control.best_of_n_step
    before = {k: v.detach().clone() for k, v in trainer.model.raw_unet.named_parameters()}
    seen = []
    trainer.train(lambda tr, batch, generator: seen.append(step(tr, batch, generator)) or seen[-1])
    assert seen[0].trained.tolist() == [False, True] and trainer.counters["nonfinite_skips"] == 0
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.raw_unet.named_parameters())
