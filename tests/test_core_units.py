"""Value-checking unit tests of the pure modules in `sharpening/` (sampler, trajectory, losses, data, sdxl).

Every test checks numbers: against diffusers' own scheduler, against a hand-written recursion or formula, or
against arithmetic written out in the test. Nothing here imports reward.py or the training scripts.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
from PIL import Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from conftest import write_image_folder
from sharpening import data as sdata
from sharpening import losses, sdxl, trajectory
from sharpening.sampler import DDIM, guided
from sharpening.sdxl import Conditioning

# ----------------------------------------------------------------------------------------------- helpers

# The scheduler config stabilityai/stable-diffusion-xl-base-1.0 ships (an Euler config; clip_sample and
# set_alpha_to_one are extra keys that the DDIM scheduler built from it picks up).
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def sdxl_config(**overrides) -> dict:
    return dict(SDXL_SCHEDULER, **overrides)


def reference_scheduler(config: dict, steps: int = 25, float64: bool = True) -> DDIMScheduler:
    """diffusers' DDIMScheduler for `config`. Its alpha-bars are float32 tensors, so for float64 inputs its step
    rounds sqrt(alpha-bar) to float32 (~6e-8 relative, x 1/sqrt(abar) ~ 15 at t = 961: up to ~3e-6 absolute on
    O(1) inputs). float64=True runs diffusers' own step code on the SAME alpha-bar values held in float64, so
    the comparison checks the algorithm, not float32 rounding."""
    ref = DDIMScheduler.from_config(config)
    ref.set_timesteps(steps)
    if float64:
        ref.alphas_cumprod = ref.alphas_cumprod.double()
        ref.final_alpha_cumprod = torch.tensor(float(ref.final_alpha_cumprod), dtype=torch.float64)
    return ref


def reference_step(ref: DDIMScheduler, model_output, timesteps, sample):
    """diffusers' DDIMScheduler.step(eta=0), one sample at a time (it only takes a scalar timestep)."""
    prev, x0 = [], []
    for i, t in enumerate(timesteps.tolist()):
        out = ref.step(model_output[i : i + 1], int(t), sample[i : i + 1], eta=0.0)
        prev.append(out.prev_sample)
        x0.append(out.pred_original_sample)
    return torch.cat(prev), torch.cat(x0)


def cond_of(values: list[float], tokens: int = 3, width: int = 4) -> Conditioning:
    """A Conditioning whose every field of row r holds values[r] (so rows are recognisable)."""
    v = torch.tensor(values, dtype=torch.float64)
    return Conditioning(
        v.view(-1, 1, 1).expand(-1, tokens, width).clone(),
        v.view(-1, 1).expand(-1, width).clone(),
        v.view(-1, 1).expand(-1, 6).clone(),
    )


# Per-sample timesteps spanning the grid, including its first (961) and last (1) entries.
MIXED_T = torch.tensor([961, 521, 41, 1, 881, 1])


# ----------------------------------------------------------------------------------------------- 1. DDIM


def test_ddim_sdxl_grid_is_961_down_to_1_with_stride_40():
    ddim = DDIM(sdxl_config(), 25)
    assert ddim.grid.tolist() == list(range(961, 0, -40))
    assert len(ddim.grid) == 25 and ddim.grid[0] == 961 and ddim.grid[-1] == 1
    assert ddim.stride == 40
    assert ddim.grid.dtype == torch.long


def test_ddim_from_plain_euler_scheduler_config_has_the_same_grid():
    euler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
    ddim = DDIM(euler.config, 25)
    assert ddim.grid.tolist() == list(range(961, 0, -40)) and ddim.stride == 40


def test_alpha_bar_below_zero_is_final_alpha_cumprod():
    ddim = DDIM(sdxl_config(), 25)  # set_alpha_to_one=False: final = alphas_cumprod[0]
    abar = ddim.alpha_bar(torch.tensor([961, 1, 0, -39]))
    ac = ddim.scheduler.alphas_cumprod.double()
    assert abar.tolist() == [ac[961].item(), ac[1].item(), ac[0].item(), ac[0].item()]
    ddim_one = DDIM(sdxl_config(set_alpha_to_one=True), 25)
    assert ddim_one.alpha_bar(torch.tensor([-39])).item() == 1.0


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_batched_step_with_per_sample_timesteps_equals_diffusers_ddim_step(prediction_type, set_alpha_to_one):
    config = sdxl_config(prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one)
    ddim, ref = DDIM(config, 25), reference_scheduler(config)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(len(MIXED_T), 4, 3, 3, generator=g, dtype=torch.float64)
    model_output = torch.randn(len(MIXED_T), 4, 3, 3, generator=g, dtype=torch.float64)

    prev, x0 = ddim.step_at(model_output, MIXED_T, sample)
    ref_prev, ref_x0 = reference_step(ref, model_output, MIXED_T, sample)

    assert prev.dtype == torch.float64 and prev.shape == sample.shape
    torch.testing.assert_close(prev, ref_prev, rtol=0, atol=1e-6)
    torch.testing.assert_close(x0, ref_x0, rtol=0, atol=1e-6)
    # The rows at timestep 1 (the last grid step, prev = -39) really used final_alpha_cumprod:
    last = MIXED_T == 1
    final = 1.0 if set_alpha_to_one else ddim.scheduler.alphas_cumprod[0].item()
    _, eps = ddim.split_prediction(model_output, sample, MIXED_T)
    manual = math.sqrt(final) * x0[last] + math.sqrt(1 - final) * eps[last]
    torch.testing.assert_close(prev[last], manual, rtol=0, atol=1e-12)


def test_step_over_grid_indices_is_the_step_at_their_timesteps():
    # The Sampler interface steps by grid index; index 24 (t = 1) is the last step, to final_alpha_cumprod.
    ddim = DDIM(sdxl_config(), 25)
    index = torch.tensor([0, 11, 23, 24])
    assert ddim.grid[index].tolist() == [961, 521, 41, 1]
    g = torch.Generator().manual_seed(5)
    sample, model_output = torch.randn(2, 4, 4, 3, 3, generator=g, dtype=torch.float64)
    for a, b in zip(ddim.step(model_output, index, sample), ddim.step_at(model_output, ddim.grid[index], sample)):
        assert torch.equal(a, b)


def test_batched_step_float32_matches_diffusers():
    # float32 in/out, as in training, against the STOCK diffusers scheduler (float32 alpha-bars): values are
    # O(1) to O(15) (x0 = x / sqrt(abar) at t = 961), so float32 resolution there is ~1e-6; atol 1e-5.
    config = sdxl_config()
    ddim, ref = DDIM(config, 25), reference_scheduler(config, float64=False)
    g = torch.Generator().manual_seed(1)
    sample, model_output = torch.randn(2, len(MIXED_T), 4, 3, 3, generator=g)
    prev, x0 = ddim.step_at(model_output, MIXED_T, sample)
    ref_prev, ref_x0 = reference_step(ref, model_output, MIXED_T, sample)
    assert prev.dtype == torch.float32
    torch.testing.assert_close(prev, ref_prev, rtol=0, atol=1e-5)
    torch.testing.assert_close(x0, ref_x0, rtol=0, atol=1e-5)


def test_add_noise_equals_diffusers_add_noise_per_sample():
    config = sdxl_config()
    ddim, ref = DDIM(config, 25), reference_scheduler(config)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(len(MIXED_T), 4, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(len(MIXED_T), 4, 3, 3, generator=g, dtype=torch.float64)
    ours = ddim.add_noise(x0, noise, MIXED_T)
    theirs = torch.cat([ref.add_noise(x0[i : i + 1], noise[i : i + 1], MIXED_T[i : i + 1]) for i in range(len(MIXED_T))])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_split_prediction_recovers_x0_and_eps_of_a_synthetic_state(prediction_type):
    ddim = DDIM(sdxl_config(prediction_type=prediction_type), 25)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(len(MIXED_T), 4, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(len(MIXED_T), 4, 2, 2, generator=g, dtype=torch.float64)
    ac = ddim.scheduler.alphas_cumprod.double()[MIXED_T].view(-1, 1, 1, 1)
    x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * eps
    v = ac.sqrt() * eps - (1 - ac).sqrt() * x0
    output = eps if prediction_type == "epsilon" else v
    x0_hat, eps_hat = ddim.split_prediction(output, x_t, MIXED_T)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-9)


def test_exact_noise_of_a_noised_state_is_the_noise_used():
    ddim = DDIM(sdxl_config(), 25)
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(2, len(MIXED_T), 4, 2, 2, generator=g, dtype=torch.float64)
    x_t = ddim.add_noise(x0, eps, MIXED_T)
    torch.testing.assert_close(ddim.exact_noise(x0, x_t, MIXED_T), eps, rtol=0, atol=1e-9)


def test_target_is_noise_for_epsilon_and_get_velocity_for_v_prediction():
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(2, len(MIXED_T), 4, 2, 2, generator=g, dtype=torch.float64)
    assert torch.equal(DDIM(sdxl_config(), 25).target(x0, noise, MIXED_T), noise)
    config = sdxl_config(prediction_type="v_prediction")
    ours = DDIM(config, 25).target(x0, noise, MIXED_T)
    theirs = reference_scheduler(config).get_velocity(x0, noise, MIXED_T)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_batched_step_equals_diffusers_when_clip_sample_is_on():
    # A genuine DDIM config with clip_sample on: only x0 is clamped, as DDIMScheduler.step does by default.
    config = {**sdxl_config(), "_class_name": "DDIMScheduler", "clip_sample": True}
    ddim, ref = DDIM(config, 25), reference_scheduler(config)
    assert ddim.scheduler.config.clip_sample is True
    g = torch.Generator().manual_seed(6)
    sample = 3 * torch.randn(len(MIXED_T), 4, 3, 3, generator=g, dtype=torch.float64)  # x0 beyond [-1, 1]
    model_output = torch.randn(len(MIXED_T), 4, 3, 3, generator=g, dtype=torch.float64)
    prev, _ = ddim.step_at(model_output, MIXED_T, sample)
    ref_prev, _ = reference_step(ref, model_output, MIXED_T, sample)
    torch.testing.assert_close(prev, ref_prev, rtol=0, atol=1e-6)


def test_ddim_from_euler_config_without_clip_sample_does_not_clamp_latent_x0():
    euler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
    ddim = DDIM(euler.config, 25)  # the config tiny.py saves; SDXL latents (std ~1) routinely exceed 1
    t = torch.tensor([481])
    x0 = torch.full((1, 4, 2, 2), 2.5, dtype=torch.float64)
    eps = torch.zeros_like(x0)
    x0_hat, _ = ddim.split_prediction(eps, ddim.add_noise(x0, eps, t), t)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------- 2. Conditioning, CFG


def test_conditioning_repeat_is_candidate_major():
    B, n = 2, 3
    rep = cond_of([10.0, 20.0]).repeat(n)
    assert rep.prompt_embeds.shape == (n * B, 3, 4) and rep.pooled.shape == (n * B, 4) and rep.time_ids.shape == (n * B, 6)
    for i in range(n):
        for b in range(B):
            row = i * B + b
            expected = [10.0, 20.0][b]
            assert rep.prompt_embeds[row].unique().tolist() == [expected]
            assert rep.pooled[row].unique().tolist() == [expected]
            assert rep.time_ids[row].unique().tolist() == [expected]


def test_conditioning_select_and_cat():
    c = cond_of([1.0, 2.0, 3.0])
    picked = c.select(torch.tensor([2, 0, 2]))
    assert picked.pooled[:, 0].tolist() == [3.0, 1.0, 3.0]
    assert picked.prompt_embeds[:, 0, 0].tolist() == [3.0, 1.0, 3.0]
    assert picked.time_ids[:, 0].tolist() == [3.0, 1.0, 3.0]
    both = Conditioning.cat([cond_of([7.0]), c])
    assert both.pooled[:, 0].tolist() == [7.0, 1.0, 2.0, 3.0]
    assert both.prompt_embeds[:, 1, 2].tolist() == [7.0, 1.0, 2.0, 3.0]
    assert both.time_ids[:, 5].tolist() == [7.0, 1.0, 2.0, 3.0]


class RecordingModel:
    """Fake UNet: output = the row's pooled[:, 0] broadcast over the latent + 0 * x; records each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond):
        self.calls.append((x.shape[0], t.clone(), cond.pooled[:, 0].clone()))
        return cond.pooled[:, 0].view(-1, 1, 1, 1).to(x.dtype) + 0 * x


def test_guided_with_scale_one_calls_the_model_once_on_the_conditional_batch():
    model = RecordingModel()
    x, t = torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.tensor([961, 41])
    out = guided(model, cond_of([-1.0, -1.0]), 1.0)(x, t, cond_of([3.0, 4.0]))
    assert len(model.calls) == 1 and model.calls[0][0] == 2
    assert out[:, 0, 0, 0].tolist() == [3.0, 4.0]


def test_guided_with_scale_s_is_uncond_plus_s_times_difference_in_one_call():
    model = RecordingModel()
    x, t = torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.tensor([961, 41])
    out = guided(model, cond_of([1.0, 2.0]), 5.0)(x, t, cond_of([3.0, 10.0]))
    assert len(model.calls) == 1
    size, t_seen, pooled_seen = model.calls[0]
    assert size == 4 and t_seen.tolist() == [961, 41, 961, 41] and pooled_seen.tolist() == [1.0, 2.0, 3.0, 10.0]
    # prompt 0: 1 + 5 * (3 - 1) = 11;  prompt 1: 2 + 5 * (10 - 2) = 42
    assert torch.equal(out, torch.tensor([11.0, 42.0], dtype=torch.float64).view(2, 1, 1, 1).expand(2, 1, 2, 2))


def test_guided_without_uncond_is_the_plain_model():
    model = RecordingModel()
    assert guided(model, None, 7.0) is model


# ----------------------------------------------------------------------------------------------- 3. trajectory


def test_draw_start_indices_only_and_all_legal_starts():
    ddim = DDIM(sdxl_config(), 25)
    g = torch.Generator().manual_seed(0)
    for m, legal in [(3, set(range(961, 80, -40))), (1, set(range(961, 0, -40))), (25, {961}), (24, {961, 921})]:
        index = torch.cat([trajectory.draw_start_indices(ddim, 16, m, g) for _ in range(200)])
        assert index.dtype == torch.long and int(index.max()) + m - 1 == len(ddim.grid) - 1
        drawn = ddim.grid[index]
        assert drawn.shape == (3200,)
        assert set(drawn.tolist()) == legal, m
        # every state visited (start - k * stride, k < m) is on the grid: the drawn path's states, not the table's
        visited = ddim.grid[index.unique()[:, None] + torch.arange(m)]
        assert set(visited.flatten().tolist()) <= set(ddim.grid.tolist()) and int(visited.min()) == 1


def test_max_start_timestep_limits_starts_to_the_later_grid():
    ddim = DDIM(sdxl_config(), 25)
    first = trajectory.first_start_index(ddim, 451)
    assert first == 13 and int(ddim.grid[first]) == 441 and trajectory.first_start_index(ddim, None) == 0
    drawn = ddim.grid[trajectory.draw_start_indices(ddim, 4000, 3, torch.Generator().manual_seed(0), first)]
    assert set(drawn.tolist()) == set(range(441, 80, -40))
    with pytest.raises(ValueError, match="no start position"):
        trajectory.draw_start_indices(ddim, 1, 3, torch.Generator(), trajectory.first_start_index(ddim, 50))


def test_min_start_timestep_limits_starts_to_the_earlier_grid():
    """--min_start_timestep: starts only at grid timesteps >= it (alone, or with --max_start_timestep as a window)."""
    ddim = DDIM(sdxl_config(), 25)
    last = trajectory.last_start_index(ddim, 600)
    assert last == 9 and int(ddim.grid[last]) == 601 and trajectory.last_start_index(ddim, None) is None
    g = torch.Generator().manual_seed(0)
    drawn = ddim.grid[trajectory.draw_start_indices(ddim, 4000, 3, g, 0, last)]
    assert set(drawn.tolist()) == set(range(961, 600, -40))
    window = ddim.grid[trajectory.draw_start_indices(ddim, 4000, 3, g, trajectory.first_start_index(ddim, 800), last)]
    assert set(window.tolist()) == set(range(761, 600, -40))
    # A bound below every start that leaves room for m states changes nothing; one above the grid leaves none.
    assert set(ddim.grid[trajectory.draw_start_indices(ddim, 4000, 3, g, 0, trajectory.last_start_index(ddim, 0))].tolist()) == set(range(961, 80, -40))
    with pytest.raises(ValueError, match="no start position"):
        trajectory.draw_start_indices(ddim, 1, 3, g, 0, trajectory.last_start_index(ddim, 990))


def test_draw_start_indices_is_reproducible_from_the_generator():
    ddim = DDIM(sdxl_config(), 25)
    a = trajectory.draw_start_indices(ddim, 8, 3, torch.Generator().manual_seed(7))
    b = trajectory.draw_start_indices(ddim, 8, 3, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_effective_steps_clips_to_the_grid():
    ddim = DDIM(sdxl_config(), 25)
    assert [trajectory.effective_steps(ddim, m) for m in (3, 25, 26, 100, 1, 0, -2)] == [3, 25, 25, 25, 1, 1, 1]
    small = DDIM(sdxl_config(), 4)
    assert small.grid.tolist() == [751, 501, 251, 1] and trajectory.effective_steps(small, 3) == 3
    assert trajectory.effective_steps(small, 9) == 4


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_explore_states_equal_manual_ddim_recursion(prediction_type):
    config = sdxl_config(prediction_type=prediction_type)
    ddim, ref = DDIM(config, 25), reference_scheduler(config)
    m = 3
    t_start = torch.tensor([961, 81, 481, 81])  # 81 is the last legal start for m = 3: it visits 81, 41, 1
    g = torch.Generator().manual_seed(8)
    x_start = torch.randn(4, 2, 2, 2, generator=g, dtype=torch.float64)
    cond = cond_of([0.5, -0.25, 1.0, 2.0])

    def model(x, t, c):  # depends on the state, the per-row timestep and the row's conditioning
        return 0.3 * x + (t.to(x.dtype) / 1000).view(-1, 1, 1, 1) + 0.1 * c.pooled[:, :1].view(-1, 1, 1, 1)

    start = torch.tensor([0, 22, 12, 22])  # grid indices of t_start
    assert ddim.grid[start].tolist() == t_start.tolist()
    out = trajectory.explore(model, ddim, x_start, start, cond, m)
    assert out.states.shape == (m, 4, 2, 2, 2) and out.x0_preds.shape == (m, 4, 2, 2, 2)
    assert out.timesteps.tolist() == [[961, 81, 481, 81], [921, 41, 441, 41], [881, 1, 401, 1]]

    x = x_start
    for k in range(m):
        t = out.timesteps[k]
        torch.testing.assert_close(out.states[k], x, rtol=0, atol=1e-6)
        x, x0 = reference_step(ref, model(x, t, cond), t, x)
        torch.testing.assert_close(out.x0_preds[k], x0, rtol=0, atol=1e-6)


def test_explore_with_zero_output_keeps_x0_and_scales_states():
    # epsilon model output 0: x0_hat = x_t / sqrt(abar_t) and x_{t-40} = sqrt(abar_{t-40}) * x0_hat.
    ddim = DDIM(sdxl_config(), 25)
    x_start = torch.full((2, 1, 1, 1), 0.5, dtype=torch.float64)
    start = torch.tensor([0, 12])  # 961, 481
    out = trajectory.explore(lambda x, t, c: torch.zeros_like(x), ddim, x_start, start, cond_of([0.0, 0.0]), 2)
    ac = ddim.scheduler.alphas_cumprod.double()
    for row, t in enumerate([961, 481]):
        x0 = 0.5 / ac[t].sqrt()
        assert out.x0_preds[0, row].item() == pytest.approx(x0.item(), rel=1e-12)
        assert out.states[1, row].item() == pytest.approx((ac[t - 40].sqrt() * x0).item(), rel=1e-12)
        assert out.x0_preds[1, row].item() == pytest.approx(x0.item(), rel=1e-12)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_explore_to_end_finishes_each_row_as_its_own_sampling_loop(guidance):
    # --path_reward final: rows at different grid positions continue to the end together; each must finish exactly
    # where stepping that row alone to the end of the grid lands (its last x0 prediction), with its own negative
    # branch under guidance, and only the rows still on the grid go through the model.
    ddim, ref = DDIM(sdxl_config(), 25), reference_scheduler(sdxl_config())
    g = torch.Generator().manual_seed(9)
    x_start = torch.randn(4, 2, 2, 2, generator=g, dtype=torch.float64)
    cond, negative = cond_of([0.5, -0.25, 1.0, 2.0]), cond_of([-1.0, 0.0, 0.25, -0.5])
    rows_seen = []

    def denoiser(x, t, c):
        rows_seen.append(len(x))
        return 0.3 * x + (t.to(x.dtype) / 1000).view(-1, 1, 1, 1) + 0.1 * c.pooled[:, :1].view(-1, 1, 1, 1)

    model = guided(denoiser, negative, guidance)
    start, m = torch.tensor([0, 22, 12, 20]), 3  # row 1 ends its m steps at the grid's end; row 0 needs 22 more
    out = trajectory.explore(model, ddim, x_start, start, cond, m, to_end=True)
    calls = 2 if guidance > 1 else 1  # rows per denoiser call: [negative; positive] under guidance
    assert sum(rows_seen) == calls * (4 * m + 22 + 0 + 10 + 2)  # the m explored steps, then each row's own remainder
    preview_only = trajectory.explore(model, ddim, x_start, start, cond, m)
    torch.testing.assert_close(out.x0_preds, preview_only.x0_preds, rtol=0, atol=0)
    assert out.scored_latents().shape == (1, 4, 2, 2, 2) and preview_only.scored_latents().shape == (m, 4, 2, 2, 2)
    for row in range(4):
        x, x0 = x_start[row : row + 1], None
        alone = guided(denoiser, negative.select(torch.tensor([row])), guidance)
        for t in ddim.grid[int(start[row]):]:
            t = t.view(1)
            x, x0 = reference_step(ref, alone(x, t, cond.select(torch.tensor([row]))), t, x)
        torch.testing.assert_close(out.finished[row : row + 1], x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.finished[1], out.x0_preds[-1, 1], rtol=0, atol=0)  # already at the end
    assert not torch.allclose(out.finished[0], out.x0_preds[-1, 0])


def test_endpoints_are_the_finished_images_when_exploration_ran_to_the_end():
    states = torch.zeros(2, 4, 1, 1, 1)
    exploration = trajectory.Exploration(states, torch.zeros(2, 4), torch.arange(8.0).view(2, 4, 1, 1, 1))
    rewards = torch.tensor([0.0, 1.0, 2.0, -1.0])  # n = 2, B = 2: winners 1 (prompt 0) and 0 (prompt 1)
    c = trajectory.Candidates(torch.zeros(2, 1, 1, 1), torch.zeros(4, 1, 1, 1), exploration, rewards, trajectory.select(rewards, 2))
    assert c.endpoints_of(c.selection.winner).flatten().tolist() == [6.0, 5.0]  # last previews, rows 2 and 1
    exploration.finished = torch.arange(10.0, 14.0).view(4, 1, 1, 1)
    assert c.endpoints_of(c.selection.winner).flatten().tolist() == [12.0, 11.0]


def test_path_reward_final_is_the_finished_images_reward():
    assert trajectory.path_reward(torch.tensor([[0.25, float("nan")]]), "final")[0].item() == 0.25
    with pytest.raises(ValueError, match="to_end"):
        trajectory.path_reward(torch.ones(3, 2), "final")


def test_path_reward_sum_mean_and_nan():
    r = torch.tensor([[1.0, 2.0, 0.5], [3.0, float("nan"), 0.5], [5.0, 6.0, 2.0]])
    s = trajectory.path_reward(r, "sum")
    assert s[0].item() == 9.0 and math.isnan(s[1].item()) and s[2].item() == 3.0
    mu = trajectory.path_reward(r, "mean")
    assert mu[0].item() == 3.0 and math.isnan(mu[1].item()) and mu[2].item() == 1.0
    with pytest.raises(ValueError, match="path_reward"):
        trajectory.path_reward(r, "max")


def rows(per_candidate: list[list[float]]) -> torch.Tensor:
    """[[prompt0, prompt1] for candidate i] -> candidate-major flat (n*B,) rewards."""
    return torch.tensor(per_candidate).flatten()


def test_within_prompt_squares_are_the_parts_of_the_pooled_within_prompt_std():
    nan = float("nan")
    # prompt 0: 1, 2, 3 (mean 2, squares 1 + 0 + 1); prompt 1: 10, 14, NaN (mean 12, squares 4 + 4); dof 2 + 1
    squares, dof = trajectory.within_prompt_squares(torch.tensor([1.0, 10.0, 2.0, 14.0, 3.0, nan]), 3)
    assert (squares, dof) == (pytest.approx(10.0), 3)
    assert math.sqrt(squares / dof) == pytest.approx(math.sqrt(10 / 3))
    assert trajectory.within_prompt_squares(torch.tensor([1.0, nan, nan, nan]), 2) == (0.0, 0)  # no spread to estimate


def test_select_is_per_prompt_not_over_the_flattened_batch():
    # prompt 0 candidates [1, 5, 3]; prompt 1 candidates [9, 2, 4]
    r = rows([[1.0, 9.0], [5.0, 2.0], [3.0, 4.0]])
    assert r.tolist() == [1.0, 9.0, 5.0, 2.0, 3.0, 4.0]  # row i*B + b
    sel = trajectory.select(r, 3)
    assert sel.winner.tolist() == [1, 0] and sel.loser.tolist() == [0, 1]
    assert sel.winner_reward.tolist() == [5.0, 9.0] and sel.loser_reward.tolist() == [1.0, 2.0]
    assert sel.has_winner.tolist() == [True, True] and sel.has_pair.tolist() == [True, True]


def test_select_nan_candidates_never_win_or_lose():
    nan = float("nan")
    # prompt 0 [nan, 2, 1]; prompt 1 [3, nan, 7]
    sel = trajectory.select(rows([[nan, 3.0], [2.0, nan], [1.0, 7.0]]), 3)
    assert sel.winner.tolist() == [1, 2] and sel.loser.tolist() == [2, 0]
    assert sel.winner_reward.tolist() == [2.0, 7.0] and sel.loser_reward.tolist() == [1.0, 3.0]
    assert sel.has_pair.tolist() == [True, True]


def test_select_all_nan_prompt_has_no_winner_and_tie_has_no_pair():
    nan = float("nan")
    # prompt 0 all NaN; prompt 1 tied [2, 2, 2]
    sel = trajectory.select(rows([[nan, 2.0], [nan, 2.0], [nan, 2.0]]), 3)
    assert sel.has_winner.tolist() == [False, True]
    assert sel.has_pair.tolist() == [False, False]
    assert sel.winner_reward[1].item() == 2.0 and sel.loser_reward[1].item() == 2.0
    # a single scored candidate is a winner but no pair: prompt 0 [nan, 4, nan]; prompt 1 [1, 1, 3]
    sel = trajectory.select(rows([[nan, 1.0], [4.0, 1.0], [nan, 3.0]]), 3)
    assert sel.has_winner.tolist() == [True, True] and sel.has_pair.tolist() == [False, True]
    assert sel.winner.tolist() == [1, 2] and sel.loser[0].item() == 1
    assert sel.winner_reward.tolist() == [4.0, 3.0] and sel.loser_reward.tolist() == [4.0, 1.0]


class FakeReward:
    name = "fake"

    def __init__(self):
        self.calls = []

    def evaluate(self, images, prompts):
        from rewards.base import RewardOutput

        self.calls.append((list(images), list(prompts)))
        total = torch.tensor(images, dtype=torch.float64) * 2  # "image" k*100 + row -> reward 2x
        return RewardOutput(total=total, components={"a": total / 2, "b": -total})


def test_score_exploration_scores_all_states_in_one_call_step_major():
    m, N = 2, 3
    x0_preds = torch.tensor([[100.0 * k + r for r in range(N)] for k in range(m)]).view(m, N, 1, 1, 1)
    exploration = trajectory.Exploration(torch.zeros(m, N, 1, 1, 1), torch.tensor([[961, 961, 81], [921, 921, 41]]), x0_preds)
    decoded = []

    def decode(latents):  # fake VAE: one "image" (a float) per latent, in the order given; 102 "overflowed"
        decoded.append(latents.shape)
        return [float(v) for v in latents.flatten()], latents.flatten() != 102.0

    reward = FakeReward()
    prompts = ["p0", "p1", "p0"]
    trajectory.score_exploration(exploration, prompts, decode, reward)
    assert decoded == [torch.Size([m * N, 1, 1, 1])]
    assert len(reward.calls) == 1
    images, seen_prompts = reward.calls[0]
    assert images == [0.0, 1.0, 2.0, 100.0, 101.0, 102.0]
    assert seen_prompts == ["p0", "p1", "p0", "p0", "p1", "p0"]
    # The image that did not decode to finite pixels scores NaN, never what the reward made of it.
    nan = float("nan")
    torch.testing.assert_close(exploration.step_rewards, torch.tensor([[0.0, 2.0, 4.0], [200.0, 202.0, nan]]), equal_nan=True)
    assert exploration.step_rewards.dtype == torch.float32
    torch.testing.assert_close(exploration.step_components["a"], torch.tensor([[0.0, 1.0, 2.0], [100.0, 101.0, nan]]), equal_nan=True)
    torch.testing.assert_close(exploration.step_components["b"], torch.tensor([[-0.0, -2.0, -4.0], [-200.0, -202.0, nan]]), equal_nan=True)


def test_score_exploration_of_finished_paths_scores_only_the_finished_images():
    m, N = 2, 3
    exploration = trajectory.Exploration(torch.zeros(m, N, 1, 1, 1), torch.zeros(m, N), torch.zeros(m, N, 1, 1, 1),
                                         finished=torch.tensor([5.0, 6.0, 7.0]).view(N, 1, 1, 1))
    reward = FakeReward()
    trajectory.score_exploration(exploration, ["p0", "p1", "p0"], lambda z: ([float(v) for v in z.flatten()], torch.ones(len(z), dtype=torch.bool)), reward)
    assert reward.calls == [([5.0, 6.0, 7.0], ["p0", "p1", "p0"])]
    torch.testing.assert_close(exploration.step_rewards, torch.tensor([[10.0, 12.0, 14.0]]))
    torch.testing.assert_close(trajectory.path_reward(exploration.step_rewards, "final"), torch.tensor([10.0, 12.0, 14.0]))


# ----------------------------------------------------------------------------------------------- 4. losses


def test_per_sample_mse():
    pred = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]], dtype=torch.float16)  # (2, 1, 2)
    target = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]]])
    out = losses.per_sample_mse(pred, target)
    # (1 + 4) / 2 = 2.5 ; ((3-1)^2 + (4-1)^2) / 2 = 6.5
    assert out.dtype == torch.float32 and out.tolist() == [2.5, 6.5]


def test_masked_sum_and_all_false_mask_keeps_grad():
    v = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
    assert losses.masked_sum(v, torch.tensor([True, False, True])).item() == 7.0  # 1 + 6
    zero = losses.masked_sum(v, torch.tensor([False, False, False]))
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()
    assert v.grad.tolist() == [0.0, 0.0, 0.0]


def test_masked_sum_ignores_nan_in_masked_out_rows():
    v = torch.tensor([1.0, float("nan"), 3.0], requires_grad=True)
    out = losses.masked_sum(v, torch.tensor([True, False, True]))
    assert out.item() == 4.0
    out.backward()
    assert v.grad.tolist() == [1.0, 0.0, 1.0]


def test_per_prompt_mean_hand_computed():
    from sharpening.targets import per_prompt_mean

    values = torch.tensor([1.0, 2.0, 3.0, 3.0, 4.0, 5.0])  # rows of prompts 0, 1, 2, 0, 1, 2 (m = 2 states, B = 3)
    prompt = torch.tensor([0, 1, 2, 0, 1, 2])
    assert per_prompt_mean(values, prompt, 3).tolist() == [2.0, 3.0, 4.0]
    # a prompt with no rows gets 0, not NaN
    assert per_prompt_mean(torch.tensor([2.0, 4.0]), torch.tensor([1, 1]), 2).tolist() == [0.0, 3.0]


def test_reward_dpo_logits_and_loss_hand_computed():
    pw, rw, pl, rl = torch.tensor([0.10]), torch.tensor([0.12]), torch.tensor([0.20]), torch.tensor([0.19])
    Rw, Rl = torch.tensor([0.8]), torch.tensor([0.3])
    # Delta_w = 0.10 - 0.12 = -0.02 ; Delta_l = 0.20 - 0.19 = 0.01 ; Delta_w - Delta_l = -0.03
    # logits = -beta * (-0.03) - gamma * (0.8 - 0.3) = -10 * -0.03 - 1 * 0.5 = 0.3 - 0.5 = -0.2
    logits = losses.reward_dpo_logits(pw, rw, pl, rl, Rw, Rl, beta=10.0, gamma=1.0)
    assert logits.item() == pytest.approx(-0.2, abs=1e-6)
    # loss = -log sigmoid(-0.2) = log(1 + e^0.2) = 0.7981388693815918
    loss = losses.reward_dpo_loss(logits, torch.tensor([True]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(0.2)), abs=1e-6)
    assert math.log(1 + math.exp(0.2)) == pytest.approx(0.7981388693815918, abs=1e-15)
    # two prompts, the second without a pair: its row is replaced (log 2), and only the first is trained
    logits2 = torch.tensor([-0.2, float("nan")])
    per_prompt = losses.reward_dpo_loss(logits2, torch.tensor([True, False]))
    assert per_prompt.tolist() == pytest.approx([0.7981388693815918, math.log(2)], abs=1e-6)


def test_reward_dpo_with_gamma_zero_is_diffusion_dpo_with_half_beta():
    g = torch.Generator().manual_seed(9)
    pw, rw, pl, rl = torch.rand(4, 5, generator=g, dtype=torch.float64) * 0.01 + 0.1
    beta_diffusers = 5000.0
    ours = losses.reward_dpo_logits(pw, rw, pl, rl, torch.rand(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64), beta=beta_diffusers / 2, gamma=0.0)
    for i in range(5):
        # diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py, for one pair:
        model_diff = pw[i] - pl[i]
        ref_diff = rw[i] - rl[i]
        inside_term = -0.5 * beta_diffusers * (model_diff - ref_diff)
        theirs = -1 * F.logsigmoid(inside_term)
        assert ours[i].item() == pytest.approx(inside_term.item(), abs=1e-9)
        ours_loss = losses.reward_dpo_loss(ours[i : i + 1], torch.tensor([True]))
        assert ours_loss.item() == pytest.approx(theirs.item(), abs=1e-9)


def test_reward_gap_is_a_margin_larger_gap_larger_loss():
    mse = dict(policy_mse_w=torch.tensor([0.1]), ref_mse_w=torch.tensor([0.1]), policy_mse_l=torch.tensor([0.1]), ref_mse_l=torch.tensor([0.1]))
    pair = torch.tensor([True])

    def loss(gap, gamma=1.0):
        logits = losses.reward_dpo_logits(**mse, reward_w=torch.tensor([gap]), reward_l=torch.tensor([0.0]), beta=2500.0, gamma=gamma)
        return losses.reward_dpo_loss(logits, pair).item()

    # equal errors: logits = -gap, loss = log(1 + e^gap)
    assert loss(0.0) == pytest.approx(math.log(2), abs=1e-6)
    assert loss(0.5) == pytest.approx(math.log(1 + math.exp(0.5)), abs=1e-6)
    assert loss(0.1) < loss(0.5) < loss(2.0)
    assert loss(0.5, gamma=0.0) == pytest.approx(math.log(2), abs=1e-6)


def test_reward_dpo_gradient_signs():
    pw = torch.tensor([0.10], requires_grad=True)
    pl = torch.tensor([0.20], requires_grad=True)
    logits = losses.reward_dpo_logits(pw, torch.tensor([0.12]), pl, torch.tensor([0.19]), torch.tensor([0.8]), torch.tensor([0.3]), beta=10.0, gamma=1.0)
    losses.reward_dpo_loss(logits, torch.tensor([True])).backward()
    # d loss / d pw = -sigmoid(-logits) * (-beta) = beta * sigmoid(0.2) > 0; d loss / d pl = -beta * sigmoid(0.2) < 0
    s = 1 / (1 + math.exp(-0.2))
    assert pw.grad.item() == pytest.approx(10 * s, abs=1e-5) and pw.grad.item() > 0  # lowering mse_w lowers the loss
    assert pl.grad.item() == pytest.approx(-10 * s, abs=1e-5) and pl.grad.item() < 0  # raising mse_l lowers the loss


def test_all_nan_prompt_does_not_poison_the_dpo_loss_of_the_others():
    nan = float("nan")
    sel = trajectory.select(rows([[nan, 1.0], [nan, 3.0], [nan, 2.0]]), 3)  # prompt 0 unscored, prompt 1 fine
    assert sel.has_pair.tolist() == [False, True]
    pw = torch.tensor([0.10, 0.10], requires_grad=True)
    mse = torch.tensor([0.12, 0.12])
    logits = losses.reward_dpo_logits(pw, mse, mse, mse, sel.winner_reward, sel.loser_reward, beta=10.0, gamma=1.0)
    loss = losses.masked_sum(losses.reward_dpo_loss(logits, sel.has_pair), sel.has_pair)
    # prompt 1 alone: logits = -10 * (-0.02 - 0) - (3 - 1) = 0.2 - 2 = -1.8 ; loss = log(1 + e^1.8)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(1.8)), abs=1e-5)
    loss.backward()
    assert torch.isfinite(pw.grad).all()


# ----------------------------------------------------------------------------------------------- 5. data


def test_read_prompt_file_txt(tmp_path):
    long_prompt = " ".join(["a very long prompt"] * 60)
    path = tmp_path / "prompts.txt"
    path.write_text(f"a cat\n\n   \na dog\na cat\n{long_prompt}\n  padded  \n", encoding="utf-8")
    prompts, stats = sdata.read_prompt_file(path)
    assert prompts == ["a cat", "a dog", "a cat", long_prompt, "padded"]
    assert stats == {"prompts": 5, "blank_skipped": 2, "duplicates": 1}


def test_a_caption_column_for_a_plain_text_prompt_file_is_refused(tmp_path):
    """A .txt file has no columns: --caption_column was ignored although its help says the column is then required."""
    path = tmp_path / "p.txt"
    path.write_text("a red square\n")
    with pytest.raises(ValueError, match="--caption_column 'Prompts': --prompt_file .* is plain text"):
        sdata.read_prompt_file(path, "Prompts")


def test_read_prompt_file_jsonl_fields_and_bad_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a cat"}\n{"text": "a dog"}\n\n{"prompt": "a cat", "text": "ignored"}\n{"caption": 7}\n')
    prompts, stats = sdata.read_prompt_file(path)
    assert prompts == ["a cat", "a dog", "a cat", "7"]
    assert stats == {"prompts": 4, "blank_skipped": 1, "duplicates": 1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "broken"\n{"prompt": "ok"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        sdata.read_prompt_file(bad)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"title": "x"}\n')
    with pytest.raises(ValueError, match=r"nofield\.jsonl:1: no 'prompt'"):
        sdata.read_prompt_file(nofield)
    with pytest.raises(FileNotFoundError, match="--prompt_file"):
        sdata.read_prompt_file(tmp_path / "missing.txt")


def test_caption_text():
    rng = np.random.default_rng(0)
    assert sdata.caption_text(None, rng) is None
    assert sdata.caption_text("  a cat ", rng) == "a cat"
    assert sdata.caption_text("   ", rng) is None
    assert sdata.caption_text([], rng) is None
    assert sdata.caption_text(42, rng) == "42" and sdata.caption_text(2.5, rng) == "2.5"
    picks = {sdata.caption_text(["one", "two", "three"], rng) for _ in range(50)}
    assert picks == {"one", "two", "three"}  # one element each time, every element reachable
    a = sdata.caption_text(["one", "two", "three"], np.random.default_rng(5))
    assert a == sdata.caption_text(["one", "two", "three"], np.random.default_rng(5))


def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        s = sdata.EpochSampler(50, seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(3, 0) == order(3, 0) and order(3, 4) == order(3, 4)
    assert sorted(order(3, 0)) == list(range(50))
    assert order(3, 0) != order(3, 1) and order(3, 1) != order(3, 2)
    assert order(3, 0) != order(4, 0)
    plain = sdata.EpochSampler(5, 0, shuffle=False)
    assert list(plain) == [0, 1, 2, 3, 4] and len(plain) == 5


def test_a_photo_with_an_exif_orientation_is_read_upright(tmp_path):
    """As datasets' own Image decoder reads it: an 80 x 40 JPEG tagged "rotate 90 CW" (Orientation 6) is 40 wide."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.new("RGB", (80, 40), "red").save(tmp_path / "phone.jpg", exif=exif)
    assert sdata._open_image(str(tmp_path / "phone.jpg")).size == (40, 80)


@pytest.fixture(scope="module")
def corrupt_folder_dataset(tmp_path_factory):
    folder = write_image_folder(tmp_path_factory.mktemp("imgs") / "data", count=6, corrupt=(2,))
    return sdata.load_hf_dataset(None, str(folder))


def test_image_text_dataset_skips_corrupt_row_to_next_and_names_it(corrupt_folder_dataset):
    ds = sdata.ImageTextDataset(corrupt_folder_dataset, "image", "text", resolution=32, center_crop=True, random_flip=False, seed=0)
    assert len(ds) == 6
    item = ds[2]
    assert item["caption"] == "a yellow square number 3"  # the next readable row (row 3)
    assert len(item["bad_rows"]) == 1 and item["bad_rows"][0].startswith("row 2") and "img_002.png" in item["bad_rows"][0]
    good = ds[3]
    assert good["bad_rows"] == [] and torch.equal(good["pixel_values"], item["pixel_values"])
    px = good["pixel_values"]
    assert px.shape == (3, 32, 32) and px.dtype == torch.float32
    assert px.min().item() >= -1.0 and px.max().item() <= 1.0 and px.min().item() < -0.5 and px.max().item() > 0.5
    # images are 40 high x 48 wide: resized to 32 x 38, center crop at (0, round(6 / 2) = 3)
    assert good["original_size"] == (40, 48) and good["crop_top_left"] == (0, 3)
    assert ds[0]["caption"] == "a red square number 0"


def test_require_columns_lists_available_columns(corrupt_folder_dataset):
    sdata.require_columns(corrupt_folder_dataset, {"--image_column": "image", "--caption_column": "text"})
    with pytest.raises(ValueError) as err:
        sdata.require_columns(corrupt_folder_dataset, {"--image_column": "image", "--caption_column": "caption"})
    message = str(err.value)
    assert "--caption_column='caption'" in message and "'image'" in message and "'text'" in message
    assert "--image_column" not in message


def test_a_block_of_bad_rows_reports_each_row_once(tmp_path):
    """Rows 3, 4, 5 are corrupt: each is named once, by its own index; the walk's passing them is not a report."""
    data = sdata.load_hf_dataset(None, str(write_image_folder(tmp_path / "data", count=10, size=8, corrupt=(3, 4, 5))))
    ds = sdata.ImageTextDataset(data, "image", "text", resolution=8, center_crop=True, random_flip=False, seed=0)
    ds.max_bad_fraction = 0.3  # as the Trainer sets it from the flag: a run of 3 bad rows is within 30% of 10
    items = [ds[i] for i in range(len(ds))]
    reported = [name.split(" (")[0] for item in items for name in item["bad_rows"]]
    assert reported == ["row 3", "row 4", "row 5"]
    assert [items[i]["caption"] for i in (3, 4, 5)] == ["a blue square number 6"] * 3  # row 6 stands in for each


def test_a_wrong_image_column_stops_after_a_run_the_bad_fraction_cannot_allow(tmp_path, caplog):
    """30 rows at --max_bad_fraction 0.1 tolerate 3 bad rows: the 4th in a row stops the search, naming the column."""
    data = sdata.load_hf_dataset(None, str(write_image_folder(tmp_path / "data", count=30, size=8)))
    ds = sdata.ImageTextDataset(data, "text", "text", resolution=8, center_crop=True, random_flip=False, seed=0)
    ds.max_bad_fraction = 0.1
    with caplog.at_level("WARNING", logger="sharpening.data"), pytest.raises(RuntimeError) as err:
        ds[0]
    message = str(err.value)
    assert message.startswith("4 consecutive rows from row 0 are unreadable") and "--image_column 'text'" in message
    assert len(caplog.records) == 1  # one warning (the sampled row), not one per row of the dataset


def test_images_inside_an_imagefolder_zip_are_read(tmp_path):
    """An imagefolder holding train.zip: datasets gives `zip://img_0.png::.../train.zip` paths."""
    import json
    import zipfile

    from PIL import Image

    (tmp_path / "data").mkdir()
    with zipfile.ZipFile(tmp_path / "data" / "train.zip", "w") as archive:
        for i, colour in enumerate(["red", "blue"]):
            Image.new("RGB", (12, 10), colour).save(tmp_path / f"img_{i}.png")
            archive.write(tmp_path / f"img_{i}.png", f"img_{i}.png")
        archive.writestr("metadata.jsonl", "".join(json.dumps({"file_name": f"img_{i}.png", "text": f"cap {i}"}) + "\n" for i in range(2)))
    data = sdata.load_hf_dataset(None, str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    ds = sdata.ImageTextDataset(data, "image", "text", resolution=8, center_crop=True, random_flip=False, seed=0)
    item = ds[1]
    assert item["caption"] == "cap 1" and item["bad_rows"] == [] and item["original_size"] == (10, 12)
    assert item["pixel_values"][2].min().item() == 1.0 and item["pixel_values"][0].max().item() == -1.0  # pure blue


def test_an_image_column_of_raw_bytes_is_read(tmp_path):
    """Parquet written by pandas / pyarrow (webdataset-style `jpg` columns) has binary values, not datasets' Image
    feature: every row counted as bad and the run stopped, blaming --image_column."""
    import io

    import datasets
    from PIL import Image

    encoded = []
    for colour in ("red", "blue"):
        buffer = io.BytesIO()
        Image.new("RGB", (12, 10), colour).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    data = datasets.Dataset.from_dict({"jpg": encoded, "txt": ["cap 0", "cap 1"]},
                                      features=datasets.Features({"jpg": datasets.Value("binary"), "txt": datasets.Value("string")}))
    ds = sdata.ImageTextDataset(data, "jpg", "txt", resolution=8, center_crop=True, random_flip=False, seed=0)
    item = ds[1]
    assert item["caption"] == "cap 1" and item["bad_rows"] == [] and item["original_size"] == (10, 12)
    assert item["pixel_values"][2].min().item() == 1.0 and item["pixel_values"][0].max().item() == -1.0  # pure blue


def test_dataset_name_folder_of_a_hub_copy_is_loaded_by_its_format(tmp_path):
    """A local copy of a hub dataset (data/train-*.parquet, images as bytes) given as --dataset_name."""
    import datasets
    from PIL import Image

    (tmp_path / "copy" / "data").mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    images = [Image.new("RGB", (12, 10), "red"), Image.new("RGB", (16, 8), "blue")]
    datasets.Dataset.from_dict({"image": images, "text": ["a red one", "a blue one"]}, features=features).to_parquet(
        tmp_path / "copy" / "data" / "train-00000-of-00001.parquet")
    data = sdata.load_hf_dataset(str(tmp_path / "copy"), None, cache_dir=str(tmp_path / "cache"))
    assert len(data) == 2 and data.column_names == ["image", "text"]
    ds = sdata.ImageTextDataset(data, "image", "text", resolution=8, center_crop=True, random_flip=False, seed=0)
    assert ds[1]["caption"] == "a blue one" and ds[1]["original_size"] == (8, 16) and ds[1]["bad_rows"] == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="^--dataset_name .*empty' could not be loaded"):
        sdata.load_hf_dataset(str(tmp_path / "empty"), None, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="^--train_data_dir .*empty' could not be loaded"):
        sdata.load_hf_dataset(None, str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))


def test_prompt_files_keep_line_breaks_inside_a_prompt(tmp_path):
    """A quoted multi-line CSV prompt keeps its newline; U+2028, U+0085 and \\x0c inside a line do not split it;
    CRLF endings and a byte-order mark are dropped."""
    csv_file = tmp_path / "p.csv"
    csv_file.write_bytes('\ufeffprompt,style\r\n"line one\nline two",x\r\nplain,y\r\n'.encode())
    assert sdata.read_prompt_file(csv_file)[0] == ["line one\nline two", "plain"]
    txt = tmp_path / "p.txt"
    txt.write_bytes("\ufeffa\u2028b\r\nc\x85d\x0ce\r\n\r\nlast".encode())
    prompts, stats = sdata.read_prompt_file(txt)
    assert prompts == ["a\u2028b", "c\x85d\x0ce", "last"] and stats["blank_skipped"] == 1
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes('{"prompt": "x\u2028y"}\r\n{"prompt": "z"}\r\n'.encode())
    assert sdata.read_prompt_file(jsonl)[0] == ["x\u2028y", "z"]


def test_an_explicit_caption_column_is_required_in_prompt_files(tmp_path):
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("prompt,style\na cat,oil\na dog,\n")
    assert sdata.read_prompt_file(csv_file, "style") == (["oil"], {"prompts": 1, "blank_skipped": 1, "duplicates": 0})
    assert sdata.read_prompt_file(csv_file)[0] == ["a cat", "a dog"]  # not given: the first of prompt, prompts, text, caption
    with pytest.raises(ValueError, match=r"--caption_column 'text' is not a field"):  # "text" typed is required like any other
        sdata.read_prompt_file(csv_file, "text")
    with pytest.raises(ValueError, match=r"^--caption_column 'typo' is not a field of --prompt_file .*p\.csv'; its fields: \['prompt', 'style'\]"):
        sdata.read_prompt_file(csv_file, "typo")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat", "style": "oil"}\n{"prompt": "a dog"}\n{"style": "ink"}\n')
    assert sdata.read_prompt_file(jsonl, "style") == (["oil", "ink"], {"prompts": 2, "blank_skipped": 1, "duplicates": 0})
    with pytest.raises(ValueError, match=r"--caption_column 'typo' is not a field .* its fields: \['prompt', 'style'\]"):
        sdata.read_prompt_file(jsonl, "typo")


def test_time_ids_row_layout():
    ids = sdxl.time_ids([(40, 48), (1024, 768)], [(0, 3), (5, 6)], (32, 64))
    assert ids.dtype == torch.float32
    # (orig_h, orig_w, crop_top, crop_left, target_h, target_w)
    assert ids.tolist() == [[40, 48, 0, 3, 32, 64], [1024, 768, 5, 6, 32, 64]]


# ----------------------------------------------------------------------------------------------- 6. sdxl (tiny model)


@pytest.fixture(scope="module")
def parts(tiny_sdxl):
    return sdxl.load(str(tiny_sdxl))


def test_load_sdxl_reads_tiny_model(parts):
    assert parts.force_zeros_for_empty_prompt is True
    assert parts.scheduler_config["steps_offset"] == 1 and parts.scheduler_config["timestep_spacing"] == "leading"
    assert DDIM(parts.scheduler_config, 25).grid.tolist() == list(range(961, 0, -40))
    assert len(parts.tokenizers[0]) == 49408 and parts.tokenizers[0].model_max_length == 77
    assert parts.unet.config.cross_attention_dim == 64


def test_encode_prompts_shapes_and_long_prompt_is_truncated(parts):
    tid = sdxl.time_ids([(32, 32)] * 3, [(0, 0)] * 3, (32, 32))
    long_prompt = " ".join(["red"] * 100)  # "red" is one BPE token: BOS + 100 + EOS > 77
    exactly_77 = " ".join(["red"] * 75)  # BOS + 75 + EOS = 77 tokens: the truncation of long_prompt
    ids = parts.tokenizers[0](long_prompt).input_ids
    assert len(ids) == 102
    cond = sdxl.encode_prompts(parts, ["a cat", long_prompt, exactly_77], tid, "cpu")
    assert cond.prompt_embeds.shape == (3, 77, 64) and cond.pooled.shape == (3, 32) and cond.time_ids.shape == (3, 6)
    assert torch.equal(cond.prompt_embeds[1], cond.prompt_embeds[2])
    assert torch.equal(cond.pooled[1], cond.pooled[2])
    assert not torch.equal(cond.prompt_embeds[0], cond.prompt_embeds[1])
    assert torch.equal(cond.time_ids, tid)


def test_unconditional_is_zeros_with_force_zeros(parts):
    tid = sdxl.time_ids([(32, 32)] * 2, [(0, 0)] * 2, (32, 32))
    cond = sdxl.encode_prompts(parts, ["a cat", "a dog"], tid, "cpu")
    unc = sdxl.unconditional(parts, cond, "cpu")
    assert unc.prompt_embeds.shape == (2, 77, 64) and not unc.prompt_embeds.any()
    assert unc.pooled.shape == (2, 32) and not unc.pooled.any()
    assert torch.equal(unc.time_ids, tid)


def test_decode_is_independent_of_chunk_size(parts):
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    one = sdxl.decode(parts.vae, latents, chunk_size=1)[0]
    eight = sdxl.decode(parts.vae, latents, chunk_size=8)[0]
    assert len(one) == len(eight) == 3
    assert all(im.size == (16, 16) and im.mode == "RGB" for im in one)
    for a, b in zip(one, eight):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_default_decode_chunk_keeps_decoded_pixels_per_chunk_constant():
    assert sdxl.default_decode_chunk(512) == 8 and sdxl.default_decode_chunk(1024) == 2
    assert sdxl.default_decode_chunk(768) == 3 and sdxl.default_decode_chunk(2048) == 1
    assert sdxl.default_decode_chunk(32) >= 8


def test_cleaning_a_shared_dpo_pair_keeps_one_set_of_states():
    """RLHF's shared rows are detected by identity (one model call for both sides); cleaning an untrained prompt's
    NaN inputs must keep the two sides on one states tensor, and leave a trained prompt's rows as they were."""
    from sharpening.targets import Rows, finite_pair_where_untrained

    states = torch.randn(4, 1, 2, 2)
    states[1] = float("nan")  # rows 1 and 3 belong to prompt 1, which has no pair
    prompt = torch.tensor([0, 1, 0, 1])
    rows_w = Rows(states, torch.tensor([900, 900, 500, 500]), torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2), prompt)
    rows_l = Rows(states, rows_w.timesteps, torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2), prompt)
    rows_l.noise[3] = float("nan")
    clean_w, clean_l = finite_pair_where_untrained(rows_w, rows_l, torch.tensor([True, False]))
    assert clean_l.states is clean_w.states
    for rows in (clean_w, clean_l):
        assert all(torch.isfinite(t).all() for t in (rows.states, rows.clean, rows.noise))
    assert torch.equal(clean_w.states[[0, 2]], states[[0, 2]]) and torch.equal(clean_l.noise[[0, 2]], rows_l.noise[[0, 2]])
    untouched_w, untouched_l = finite_pair_where_untrained(rows_w, rows_l, torch.tensor([True, True]))
    assert untouched_w is rows_w and untouched_l is rows_l  # nothing untrained: the same rows, no copies


@pytest.mark.parametrize("spacing, steps, message", [
    ("trailing", 30, r"not spaced by 1000 // 30 = 33 .*divides 1000"),
    ("linspace", 25, r"not spaced by 1000 // 25 = 40 .*timestep_spacing to 'leading' or 'trailing'"),
    ("leading", 1000, r"start at t = 1000, past the schedule's 1000 timesteps"),
])
def test_ddim_grids_whose_states_would_be_mislabelled_are_refused(spacing, steps, message):
    """DDIMScheduler steps each state to t - 1000 // N. On a grid spaced otherwise the state is not at the next grid
    point, and exploration labelled and trained it with that grid point's timestep (a target error of up to 74 % on
    linspace, 25 steps); 1000 leading steps start at t = 1000 and failed with an IndexError."""
    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "steps_offset": 1, "timestep_spacing": spacing}
    with pytest.raises(ValueError, match=message):
        DDIM(config, steps)
    for fine in (("leading", 30), ("trailing", 25), ("leading", 25)):
        ddim = DDIM({**config, "timestep_spacing": fine[0]}, fine[1])
        assert (ddim.grid[:-1] - ddim.grid[1:] == ddim.stride).all()


def test_a_clean_rollout_is_the_last_x0_prediction_not_the_last_noisy_state():
    """SDXL's scheduler config (set_alpha_to_one false) ends sampling at alpha-bar 0.99915: the last latent still holds
    noise of std 0.029. RLHF re-noises its rollout as a clean x0, so it takes the last x0 prediction; a model that knows
    the image (a point mass at c) then gives c exactly."""
    from sharpening.sampler import sample

    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "steps_offset": 1, "timestep_spacing": "leading", "set_alpha_to_one": False}
    ddim = DDIM(config, 25)
    c = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def knows_c(x, t, cond):
        abar = _per_sample_abar(ddim, t, x)
        return (x - abar.sqrt() * c) / (1 - abar).sqrt()

    noise = torch.randn(c.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(sample(knows_c, ddim, noise, None, clean=True), c, rtol=0, atol=1e-9)
    leftover = sample(knows_c, ddim, noise, None) - c
    assert 0.02 < float(leftover.std()) < 0.04  # what the pipeline decodes: sqrt(1 - 0.99915) = 0.029 of noise


def _per_sample_abar(ddim, t, like):
    return ddim.alpha_bar(t).to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def test_images_become_rgb_as_a_viewer_shows_them():
    """Transparent pixels over white (they store black: convert('RGB') showed black corners), 16-bit greyscale
    scaled (convert('RGB') clipped a mid-grey 16-bit PNG to pure white)."""
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    out = np.asarray(sdata.to_rgb_on_white(rgba))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [255, 0, 0]
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 0, 128, 0])
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0
    out = np.asarray(sdata.to_rgb_on_white(palette))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [0, 128, 0]
    grey16 = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert abs(int(np.asarray(sdata.to_rgb_on_white(grey16))[0, 0, 0]) - 128) <= 1
    assert sdata.to_rgb_on_white(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_captions_that_are_not_text_are_refused_and_lists_skip_empty_entries(tmp_path):
    rng = np.random.default_rng(0)
    assert sdata.caption_text(1984.0, rng) == "1984" and sdata.caption_text(float("nan"), rng) is None
    assert {sdata.caption_text(["", "a cat", None], np.random.default_rng(s)) for s in range(20)} == {"a cat"}
    for value in ({"en": "a cat"}, b"a cat", [{"raw": "a cat"}]):
        with pytest.raises(sdata.CaptionTypeError, match="--caption_column must name a column of text"):
            sdata.caption_text(value, rng)
    import datasets

    rows = datasets.Dataset.from_dict({"text": [["a cat", "a dog"], [], ["a fox"]]})
    assert sdata.prompts_from_dataset(rows, "text") == (["a cat", "a dog", "a fox"], {"prompts": 3, "blank_skipped": 1, "duplicates": 0})
    structs = datasets.Dataset.from_dict({"meta": [{"en": "a cat"}]})
    with pytest.raises(ValueError, match="--caption_column 'meta', row 0: a caption of type dict"):
        sdata.prompts_from_dataset(structs, "meta")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": ["a cat", "a dog"]}\n{"prompt": {"en": "x"}}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl', record 2: a caption of type dict"):
        sdata.read_prompt_file(jsonl)


def test_only_the_image_and_caption_columns_are_read(tmp_path):
    """Another image column (a ControlNet condition, a mask) was decoded on every row, and a missing file there
    failed the read outside the bad-row accounting."""
    import datasets

    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(good)
    rows = datasets.Dataset.from_dict({"image": [str(good)] * 2, "mask": [str(good), str(tmp_path / "gone.png")],
                                       "text": ["a red square"] * 2}).cast_column("image", datasets.Image()).cast_column("mask", datasets.Image())
    dataset = sdata.ImageTextDataset(rows, "image", "text", 8, True, False, seed=0)
    assert dataset[1]["bad_rows"] == [] and dataset[1]["caption"] == "a red square"


def test_max_train_samples_draws_the_same_random_rows_everywhere():
    """A random subset (the first N of a sorted dataset are no sample of it), identical across runs and processes."""
    rows = sdata.subset_rows(1000, 10)
    assert rows == sdata.subset_rows(1000, 10) and rows == sorted(rows) and len(set(rows)) == 10
    assert rows != list(range(10)) and sdata.subset_rows(5, 10) == [0, 1, 2, 3, 4]


def test_an_imagefolder_without_captions_says_where_captions_come_from(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    data = sdata.load_hf_dataset(None, str(folder))
    with pytest.raises(ValueError, match=r"--caption_column='text'.*metadata.jsonl or metadata.csv beside the images"):
        sdata.require_columns(data, {"--image_column": "image", "--caption_column": "text"})
    (folder / "metadata.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl is empty: it needs a row per image"):  # was an IndexError from datasets
        sdata.load_hf_dataset(None, str(folder))


def test_trajectory_grids_frame_the_winner_and_loser_only_where_the_prompt_trains():
    """Frames land on the ranked candidates (candidate-major rows); a prompt whose candidates all tie trains nothing, so
    nothing is framed and its caption says so (candidate 0 used to be framed as its winner)."""
    from PIL import Image

    from sharpening import tracking, trajectory

    n, prompts, m, cell = 3, 2, 2, 96

    def grid_frames(rewards):
        exploration = trajectory.Exploration(torch.zeros(m, n * prompts, 1, 1, 1), torch.full((m, n * prompts), 500),
                                             torch.zeros(m, n * prompts, 1, 1, 1))
        exploration.images = [Image.new("RGB", (8, 8), (128, 128, 128)) for _ in range(m * n * prompts)]
        exploration.step_rewards = torch.stack([rewards / 2, rewards / 2])
        candidates = trajectory.Candidates(torch.zeros(prompts, 1, 1, 1), torch.zeros(n * prompts, 1, 1, 1), exploration,
                                           rewards, trajectory.select(rewards, n))
        frames = [[tracking.trajectory_grid(candidates, b, cell).getpixel((110, 14 + i * (cell + 14) + 40)) for i in range(n)]
                  for b in range(prompts)]
        return frames, [tracking._caption("p", candidates, b) for b in range(prompts)]

    grey, win, lose = (128, 128, 128), tracking.WINNER, tracking.LOSER
    frames, captions = grid_frames(torch.tensor([1.0, 9.0, 5.0, 2.0, 3.0, 4.0]))  # prompt 0: 1, 5, 3; prompt 1: 9, 2, 4
    assert frames == [[lose, win, grey], [win, lose, grey]]
    assert captions == ["p | winner 1, loser 0, gap 4", "p | winner 0, loser 1, gap 7"]
    frames, captions = grid_frames(torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0, 2.0]))  # prompt 0 all 1, prompt 1 all 2
    assert frames == [[grey] * n] * prompts and captions == ["p | no preference (not trained)"] * prompts
