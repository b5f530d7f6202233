"""The per-sample flow-matching Euler sampler (SD3/SD3.5, FLUX.1) against diffusers' FlowMatchEulerDiscreteScheduler,
which can only step the whole batch at one index; and the same exploration and targets code running on it."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sharpening import trajectory
from sharpening.sampler import FlowMatchEuler, sample
from sharpening.targets import fresh_rows

SD3 = {"num_train_timesteps": 1000, "shift": 3.0}  # stabilityai/stable-diffusion-3.5-medium's scheduler config
FLUX = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
        "base_image_seq_len": 256, "max_image_seq_len": 4096}  # FLUX.1-dev's


def reference(config: dict, steps: int, mu: float | None = None) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(steps, mu=mu)
    return scheduler


def reference_step(scheduler, model_output: torch.Tensor, index: torch.Tensor, sample_: torch.Tensor) -> torch.Tensor:
    """scheduler.step one row at a time, each at its own step index."""
    rows = []
    for i, k in enumerate(index.tolist()):
        s = copy.deepcopy(scheduler)
        s._step_index = k
        rows.append(s.step(model_output[i : i + 1], s.timesteps[k], sample_[i : i + 1]).prev_sample)
    return torch.cat(rows)


@pytest.mark.parametrize("config, mu", [(SD3, None), (FLUX, 0.8)])
def test_grid_is_the_schedulers_with_fractional_sigmas(config, mu):
    ours, ref = FlowMatchEuler(config, 10, mu=mu), reference(config, 10, mu=mu)
    assert torch.equal(ours.grid, ref.timesteps.float())
    assert ours.sigmas[-1] == 0 and len(ours.sigmas) == len(ours.grid) + 1
    assert ours.grid.dtype.is_floating_point and (ours.grid != ours.grid.round()).any()  # sigma is not truncated
    torch.testing.assert_close(ours.sigma(ours.grid), ours.sigmas[:-1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("config, mu", [(SD3, None), (FLUX, 0.8)])
@pytest.mark.parametrize("shape", [(4, 2, 3, 3), (4, 9, 8)])  # SD3 latents; FLUX's packed (N, tokens, 4·C)
def test_step_equals_scheduler_step_row_by_row(config, mu, shape):
    ours, ref = FlowMatchEuler(config, 10, mu=mu), reference(config, 10, mu=mu)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    index = torch.tensor([0, 9, 4, 9])  # mixed positions, the last index twice (it steps to sigma = 0)
    x_next, x0 = ours.step(v, index, x)
    torch.testing.assert_close(x_next, reference_step(ref, v, index, x), rtol=0, atol=1e-6)
    sigma = ours.sigmas[index].float().view(-1, *([1] * (len(shape) - 1)))
    torch.testing.assert_close(x0, x - sigma * v, rtol=0, atol=1e-6)
    torch.testing.assert_close(x_next[1], x0[1], rtol=0, atol=1e-6)  # the last step lands on the preview


def test_a_bf16_step_is_computed_in_float32_as_the_scheduler_computes_it():
    """bf16 latents (evaluate.py --dtype bf16): the scheduler upcasts the sample and takes σ_next - σ of float32
    sigmas; rounding the sigmas to bf16 first made a 28-step SD3.5 step up to 18 % too long. (The scheduler then
    multiplies by the velocity in bf16, its 0-dim step size not promoting; here that product is float32 too.)"""
    ours, ref = FlowMatchEuler(SD3, 28), reference(SD3, 28)
    g = torch.Generator().manual_seed(0)
    x, v = (torch.randn(28, 4, 2, 2, generator=g).bfloat16() for _ in range(2))
    index = torch.arange(28)
    x_next, x0 = ours.step(v, index, x)
    assert x_next.dtype == x0.dtype == torch.bfloat16
    in_float32 = reference_step(ref, v.float(), index, x.float())
    assert torch.equal(x_next, in_float32.bfloat16())
    torch.testing.assert_close(x_next, reference_step(ref, v, index, x), rtol=0.016, atol=0.016)  # bf16's rounding


def test_noise_target_and_exact_noise_are_consistent():
    ours = FlowMatchEuler(SD3, 10)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = ours.grid[torch.tensor([0, 3, 9])]
    x_t = ours.add_noise(x0, eps, t)
    ref = reference(SD3, 10)
    torch.testing.assert_close(x_t, ref.scale_noise(x0, t, eps), rtol=0, atol=1e-6)  # diffusers' forward process
    torch.testing.assert_close(ours.exact_noise(x0, x_t, t), eps, rtol=0, atol=1e-9)
    v = ours.target(x0, eps, t)
    torch.testing.assert_close(v, eps - x0)
    # A model predicting exactly the target velocity previews x0 from any state (to the float32 rounding of the
    # grid's timesteps, which add_noise reads sigma from, as diffusers' scale_noise does).
    _, x0_hat = ours.step(v, torch.tensor([0, 3, 9]), x_t)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-6)


def test_full_sampling_and_exploration_equal_the_scheduler_loop():
    ours, ref = FlowMatchEuler(SD3, 6), reference(SD3, 6)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(2, 2, 3, 3, generator=g)

    def model(x, t, cond):  # depends on the state and the per-row timestep
        return 0.5 * x - (t.to(x.dtype) / 1000).view(-1, 1, 1, 1)

    x = noise
    for t in ref.timesteps:
        x = ref.step(model(x, t.repeat(2), None), t, x).prev_sample
    torch.testing.assert_close(sample(model, ours, noise, None), x, rtol=0, atol=1e-5)

    start = torch.tensor([1, 3])
    out = trajectory.explore(model, ours, noise, start, None, 3)
    assert torch.equal(out.timesteps, ours.grid[torch.stack([start, start + 1, start + 2])])
    for row in range(2):
        s = reference(SD3, 6)
        s._step_index = int(start[row])
        x = noise[row : row + 1]
        for k in range(3):
            torch.testing.assert_close(out.states[k, row : row + 1], x, rtol=0, atol=1e-6)
            t = s.timesteps[s.step_index]
            x = s.step(model(x, t.view(1), None), t, x).prev_sample


def test_exploration_run_to_the_end_finishes_where_the_scheduler_loop_ends():
    # --path_reward final on the flow sampler: each row, continued from its own start to the end of the grid, ends at
    # the clean image scheduler.step lands on (the last Euler step goes to sigma 0, where x equals the x0 preview).
    ours = FlowMatchEuler(SD3, 6)
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(3, 2, 3, 3, generator=g)

    def model(x, t, cond):
        return 0.5 * x - (t.to(x.dtype) / 1000).view(-1, 1, 1, 1)

    start = torch.tensor([0, 2, 3])
    out = trajectory.explore(model, ours, noise, start, None, 3, to_end=True)
    for row in range(3):
        s = reference(SD3, 6)
        s._step_index = int(start[row])
        x = noise[row : row + 1]
        while s.step_index < len(s.timesteps):
            t = s.timesteps[s.step_index]
            x = s.step(model(x, t.view(1), None), t, x).prev_sample
        torch.testing.assert_close(out.finished[row : row + 1], x, rtol=0, atol=1e-5)


def test_fresh_rows_draw_training_sigmas_in_range():
    ours = FlowMatchEuler(SD3, 10)
    clean = torch.zeros(4, 2, 2, 2)
    rows = fresh_rows(ours, clean, 50, torch.Generator().manual_seed(3))
    sigma = ours.sigma(rows.timesteps)
    assert rows.timesteps.dtype.is_floating_point and 0 < sigma.min() and sigma.max() <= 1
    torch.testing.assert_close(rows.states, ours.add_noise(clean[rows.prompt], rows.noise, rows.timesteps))


def test_logit_normal_weighting_draws_the_sigmas_diffusers_sd3_scripts_draw():
    """--weighting_scheme logit_normal: the same training timesteps as diffusers' compute_density_for_timestep_sampling
    + `scheduler.timesteps[(u * N).long()]` (train_dreambooth_sd3.py) with the same generator."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ours = FlowMatchEuler(SD3, 10)
    ours.set_train_density("logit_normal", 0.5, 1.2)
    drawn = ours.draw_train_timesteps(500, torch.Generator().manual_seed(4))
    u = compute_density_for_timestep_sampling("logit_normal", 500, logit_mean=0.5, logit_std=1.2, generator=torch.Generator().manual_seed(4))
    expected = FlowMatchEulerDiscreteScheduler.from_config(SD3).timesteps[(u * 1000).long()]
    torch.testing.assert_close(drawn, expected.float(), rtol=0, atol=1e-3)
    ours.set_train_density("none")
    assert ours.draw_train_timesteps(500, torch.Generator().manual_seed(4)).std() > drawn.std()  # uniform spreads wider
    with pytest.raises(ValueError, match="weighting_scheme must be"):
        ours.set_train_density("mode")
