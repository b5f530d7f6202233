"""Training targets (sharpening/targets.py): the rows each target builds, against the arithmetic written out."""
from __future__ import annotations

import pytest
import torch

from sharpening import targets
from sharpening.sampler import DDIM
from sharpening.trajectory import Candidates, Exploration, select
from toyworld.train_base import build_scheduler

N, B, M = 3, 2, 2


@pytest.fixture(scope="module")
def ddim():
    return DDIM(dict(build_scheduler().config), 20)


@pytest.fixture(scope="module")
def alphas_cumprod():
    return torch.as_tensor(build_scheduler().alphas_cumprod, dtype=torch.float64)


@pytest.fixture()
def candidates():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, 4, 2, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(N * B, 4, 2, 2, generator=g, dtype=torch.float64)
    timesteps = torch.tensor([[901, 501] * N, [851, 451] * N])  # (m, n*B): per-row timesteps
    exploration = Exploration(states=torch.randn(M, N * B, 4, 2, 2, generator=g, dtype=torch.float64), timesteps=timesteps,
                              x0_preds=torch.randn(M, N * B, 4, 2, 2, generator=g, dtype=torch.float64))
    path_rewards = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.8, 0.4])  # candidate-major: prompt 0 -> 0.1, 0.5, 0.8
    c = Candidates(x0, noise, exploration, path_rewards, select(path_rewards, N))
    assert c.selection.winner.tolist() == [2, 0] and c.selection.loser.tolist() == [0, 1]
    return c


def expected_rows(c: Candidates, alphas_cumprod, candidate_of_prompt, clean_of_prompt):
    """(states, timesteps, prompt, clean, eps target) row by row: state k of candidate candidate_of_prompt[b] of prompt
    b, eps = (x - sqrt(abar) clean) / sqrt(1 - abar); where clean is None (the paper's target) the starting noise,
    paired with the prompt's data latent x0 (which v-prediction and flow targets, noise - x0, need)."""
    out = []
    for k in range(M):
        for b in range(B):
            row = candidate_of_prompt[b] * B + b
            state, t = c.exploration.states[k, row], int(c.exploration.timesteps[k, row])
            abar = alphas_cumprod[t]
            clean = clean_of_prompt[b]
            eps = c.noise[row] if clean is None else (state - abar.sqrt() * clean) / (1 - abar).sqrt()
            out.append((state, t, b, c.x0[b] if clean is None else clean, eps))
    return out


def assert_rows(rows: targets.Rows, expected):
    assert len(rows.prompt) == len(expected)
    for r, (state, t, b, clean, eps) in enumerate(expected):
        torch.testing.assert_close(rows.states[r], state)
        assert int(rows.timesteps[r]) == t and int(rows.prompt[r]) == b
        torch.testing.assert_close(rows.clean[r], clean.to(rows.clean.dtype))
        torch.testing.assert_close(rows.noise[r], eps.to(rows.noise.dtype), rtol=1e-6, atol=1e-9)


def endpoint(c, candidate, b):
    return c.exploration.x0_preds[-1, candidate * B + b]


@pytest.mark.parametrize("name", ["noise", "exact", "endpoint"])
def test_sft_targets_on_the_winners_states(name, ddim, alphas_cumprod, candidates):
    c, winner = candidates, candidates.selection.winner.tolist()
    clean = {"noise": [None] * B, "exact": list(c.x0), "endpoint": [endpoint(c, winner[b], b) for b in range(B)]}[name]
    assert_rows(targets.sft_rows(name, ddim, c), expected_rows(c, alphas_cumprod, winner, clean))


def test_sft_best_endpoint_regresses_every_candidates_states_onto_the_winners_endpoint(ddim, alphas_cumprod, candidates):
    c, winner = candidates, candidates.selection.winner.tolist()
    best = [endpoint(c, winner[b], b) for b in range(B)]
    expected = [row for i in range(N) for row in expected_rows(c, alphas_cumprod, [i] * B, best)]
    assert_rows(targets.sft_rows("best_endpoint", ddim, c), expected)


@pytest.mark.parametrize("name", ["noise", "exact", "endpoint"])
def test_dpo_targets_on_winner_and_loser_states(name, ddim, alphas_cumprod, candidates):
    c, sel = candidates, candidates.selection
    rows_w, rows_l = targets.dpo_rows(name, ddim, c, torch.Generator().manual_seed(0))
    for rows, which in ((rows_w, sel.winner.tolist()), (rows_l, sel.loser.tolist())):
        clean = {"noise": [None] * B, "exact": list(c.x0), "endpoint": [endpoint(c, which[b], b) for b in range(B)]}[name]
        assert_rows(rows, expected_rows(c, alphas_cumprod, which, clean))


def test_dpo_shared_puts_the_same_states_against_two_outcomes(ddim, alphas_cumprod, candidates):
    c, sel = candidates, candidates.selection
    rows_w, rows_l = targets.dpo_rows("shared", ddim, c, torch.Generator().manual_seed(0))
    for rows, which in ((rows_w, sel.winner.tolist()), (rows_l, sel.loser.tolist())):
        outcome = [endpoint(c, which[b], b) for b in range(B)]
        assert_rows(rows, [row for i in range(N) for row in expected_rows(c, alphas_cumprod, [i] * B, outcome)])


def test_dpo_fresh_noises_both_endpoints_with_one_noise_and_timestep(ddim, alphas_cumprod, candidates):
    c, sel = candidates, candidates.selection
    rows_w, rows_l = targets.dpo_rows("fresh", ddim, c, torch.Generator().manual_seed(0))
    assert torch.equal(rows_w.noise, rows_l.noise) and torch.equal(rows_w.timesteps, rows_l.timesteps)
    assert rows_w.prompt.tolist() == rows_l.prompt.tolist() == [0, 1] * M
    for rows, which in ((rows_w, sel.winner), (rows_l, sel.loser)):
        for r in range(len(rows.prompt)):
            b = int(rows.prompt[r])
            abar = alphas_cumprod[int(rows.timesteps[r])]
            clean = endpoint(c, int(which[b]), b)
            torch.testing.assert_close(rows.clean[r], clean)
            torch.testing.assert_close(rows.states[r], abar.sqrt() * clean + (1 - abar).sqrt() * rows.noise[r])


def test_unknown_target_names_the_choices(ddim, candidates):
    with pytest.raises(ValueError, match="best_endpoint"):
        targets.sft_rows("nope", ddim, candidates)
    with pytest.raises(ValueError, match="shared"):
        targets.dpo_rows("nope", ddim, candidates, torch.Generator())


def test_v_loss_weight_turns_the_epsilon_error_into_the_v_error(ddim, alphas_cumprod):
    """--loss_weighting v: an epsilon model's squared error times 1 / abar is the squared error of the v it implies."""
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1, 251, 751, 951])
    x0, noise = torch.randn(4, 4, 2, 2, generator=g, dtype=torch.float64), torch.randn(4, 4, 2, 2, generator=g, dtype=torch.float64)
    eps_hat = noise + 0.1 * torch.randn(4, 4, 2, 2, generator=g, dtype=torch.float64)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    x0_hat = (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
    v, v_hat = a.sqrt() * noise - (1 - a).sqrt() * x0, a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat
    torch.testing.assert_close(ddim.v_loss_weight(t), 1 / alphas_cumprod[t])
    torch.testing.assert_close(((eps_hat - noise) ** 2).flatten(1).mean(1) * ddim.v_loss_weight(t), ((v_hat - v) ** 2).flatten(1).mean(1))


def test_row_errors_weigh_states_by_inverse_alpha_bar_normalised_to_mean_one(ddim, alphas_cumprod):
    from types import SimpleNamespace

    from sharpening.training import Trainer

    t = torch.tensor([951, 51])
    rows = targets.Rows(torch.zeros(2, 1, 1, 1), t, torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1, 1), torch.tensor([0, 1]))
    prediction = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)  # squared errors 1 and 4 against the zero noise
    plain = Trainer.row_errors(SimpleNamespace(args=SimpleNamespace(loss_weighting="none", snr_gamma=None), sampler=ddim), prediction, rows)
    torch.testing.assert_close(plain, torch.tensor([1.0, 4.0]))
    mean_weight = float((1 / alphas_cumprod).mean())  # over the 1000 training timesteps: a fixed normaliser
    assert ddim.mean_v_loss_weight() == pytest.approx(mean_weight) and 21 < mean_weight < 22
    w = (1 / alphas_cumprod[t] / mean_weight).float()
    weighted = Trainer.row_errors(SimpleNamespace(args=SimpleNamespace(loss_weighting="v", snr_gamma=None), sampler=ddim), prediction, rows)
    torch.testing.assert_close(weighted, torch.tensor([1.0, 4.0]) * w)
    # A state's weight depends on its own timestep only, not on the other rows of the call (1/abar: 123 vs 1.05).
    alone = Trainer.row_errors(SimpleNamespace(args=SimpleNamespace(loss_weighting="v", snr_gamma=None), sampler=ddim), prediction[:1],
                               targets.Rows(*(x[:1] for x in (rows.states, rows.timesteps, rows.clean, rows.noise, rows.prompt))))
    torch.testing.assert_close(alone, weighted[:1])
    assert weighted[0] / weighted[1] == pytest.approx(float(alphas_cumprod[51] / alphas_cumprod[951]) / 4, rel=1e-5)


@pytest.mark.parametrize("family", ["sdxl", "flow"])
def test_snr_gamma_caps_a_foreign_target_near_the_end_of_sampling(ddim, family):
    """A candidate's state close to the end of sampling, regressed onto ANOTHER path's end image (the default
    targets do this), has an exact-noise target that grows as 1/sigma: here its raw error is in the thousands.
    --snr_gamma multiplies each row by min(1, gamma / SNR(t)), which turns that error into gamma times the x0 distance
    (over (1 - sigma)^2 for the flow, alpha_bar for epsilon), and leaves high-noise rows untouched."""
    from types import SimpleNamespace

    from sharpening.sampler import FlowMatchEuler
    from sharpening.training import Trainer, min_snr_weight
    from toyworld.train_base import build_flow_scheduler

    g = torch.Generator().manual_seed(0)
    state_clean, foreign, noise = (torch.randn(2, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    sampler = ddim if family == "sdxl" else FlowMatchEuler(dict(build_flow_scheduler().config), 10)
    timesteps = torch.tensor([1, 951]) if family == "sdxl" else torch.tensor([9.0, 951.0])  # near the end; near pure noise
    states = sampler.add_noise(state_clean, noise, timesteps)
    rows = targets.Rows(states, timesteps, foreign, sampler.exact_noise(foreign, states, timesteps), torch.arange(2))
    prediction = torch.zeros_like(states)
    trainer = SimpleNamespace(sampler=sampler, args=SimpleNamespace(loss_weighting="none", snr_gamma=None))
    raw = Trainer.row_errors(trainer, prediction, rows)
    trainer.args.snr_gamma = 5.0
    capped = Trainer.row_errors(trainer, prediction, rows)

    distance = (states - foreign).pow(2).flatten(1).mean(1)  # x_t - c, the jump the target asks for
    if family == "sdxl":
        abar = sampler.alpha_bar(timesteps)
        x0_weight = 1 / abar  # eps error = sqrt(abar) (x0 error) / sqrt(1 - abar); capped weight gamma (1 - abar) / abar
    else:
        x0_weight = 1 / (1 - sampler.sigma(timesteps)) ** 2  # velocity target (x_t - c) / sigma
    assert raw[0] > 1000 * raw[1]
    assert torch.allclose(min_snr_weight(sampler.snr(timesteps), 5.0), torch.tensor([5.0 / sampler.snr(timesteps)[0].item(), 1.0], dtype=torch.float64))
    snr = torch.tensor([0.01, 1.0, 5.0, 100.0], dtype=torch.float64)  # diffusers' v-prediction rule: min(SNR, gamma) / (SNR + 1)
    capped_snr = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64))
    assert torch.allclose(min_snr_weight(snr, 5.0, "v"), capped_snr / (snr + 1))
    # an x0-prediction model ("sample"): the x0 MSE weighs an x0 error by 1, so the weight is min(SNR, gamma) itself
    # (it got the epsilon rule, up to 600 times off near the end of sampling)
    assert torch.allclose(min_snr_weight(snr, 5.0, "sample"), capped_snr)
    assert torch.allclose(capped[1], raw[1])
    if family == "flow":
        assert torch.allclose(capped[0].double(), 5.0 * x0_weight[0] * distance[0], rtol=1e-5)
    else:  # eps target (x_t - sqrt(abar) c) / sqrt(1 - abar); capped: 5 (x_t - sqrt(abar) c)^2 / abar
        jump = (states[0] - abar[0].sqrt() * foreign[0]).pow(2).mean()
        assert torch.allclose(capped[0].double(), 5.0 * x0_weight[0] * jump, rtol=1e-5)
    assert capped[0] < 100 * capped[1]


def test_snr_gamma_must_be_positive(capsys):
    import train_sft_diffusion_sharpening_sdxl as sft

    with pytest.raises(SystemExit):
        sft.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", "y", "--reward_model", "brightness", "--snr_gamma", "0"])
    assert "--snr_gamma must be > 0" in capsys.readouterr().err
