"""Pure loss functions of both variants (tested against hand-computed values)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||prediction - target||^2 averaged over all but the first dimension, in fp32."""
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the rows where mask is true; 0 (still attached to the graph) when none is, so every process
    always runs backward through the same graph (DDP needs that) while skipped rows contribute nothing."""
    mask = mask.to(values.device)
    # where(), not values * mask: a NaN in a skipped row must not poison the others (NaN * 0 = NaN).
    return torch.where(mask, values, torch.zeros_like(values)).sum()


def reward_dpo_logits(
    policy_mse_w: torch.Tensor,
    ref_mse_w: torch.Tensor,
    policy_mse_l: torch.Tensor,
    ref_mse_l: torch.Tensor,
    reward_w: torch.Tensor,
    reward_l: torch.Tensor,
    beta: float,
    gamma: float,
) -> torch.Tensor:
    """Argument of the sigmoid in Eq. 11 with the Diffusion-DPO surrogate log p_theta/p_ref ~ -(mse_theta - mse_ref):
    -beta * (Delta_w - Delta_l) - gamma * (R_w - R_l), Delta = mean over the trajectory's states (inputs are (B,)).
    gamma = 0 is Diffusion-DPO on trajectories (with beta here = Diffusion-DPO's beta / 2)."""
    delta_w = policy_mse_w - ref_mse_w
    delta_l = policy_mse_l - ref_mse_l
    return -beta * (delta_w - delta_l) - gamma * (reward_w - reward_l).to(delta_w.dtype)


def reward_dpo_loss(logits: torch.Tensor, has_pair: torch.Tensor) -> torch.Tensor:
    """Eq. 11 per prompt: -log sigmoid(logits), (B,). Rows without a strict preference (tied or unscored, whose
    reward gap may be NaN) are replaced before the sigmoid, so neither their value nor their gradient can turn
    NaN; the caller trains only the rows with a pair."""
    has_pair = has_pair.to(logits.device)
    return -F.logsigmoid(torch.where(has_pair, logits, torch.zeros_like(logits)))
