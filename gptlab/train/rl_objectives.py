"""The RL objectives as pure functions of tensors: GRPO group advantages, the k3 KL estimator, PPO's per-token
rewards, GAE, whitening and the clipped policy and value losses (gptlab.train.rl's docstring gives the
formulas and their papers; tests/test_rl.py checks each against a float64 hand computation)."""

from __future__ import annotations

import torch

GRPO_STD_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = GRPO_STD_EPS) -> torch.Tensor:
    """GRPO: (r - group mean) / (group std + eps) for rewards (P * G,) laid out group after group; the
    std is the population std (ddof 0). `scale_by_std=False` (Dr. GRPO) returns r - group mean."""
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(dim=1, correction=0, keepdim=True) + eps)
    return centred.reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate exp(ref - logp) - (ref - logp) - 1 (Schulman 2020's k3)."""
    log_ratio = ref_logp - logp
    return log_ratio.exp() - log_ratio - 1


def ppo_token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef * (logp - ref_logp) at action positions (mask), plus the scalar
    score (B,) at each row's last action position; 0 elsewhere."""
    rewards = torch.where(mask, -kl_coef * (logp - ref_logp), torch.zeros_like(logp))
    last = mask.shape[1] - 1 - mask.flip(1).long().argmax(dim=1)
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last] += torch.where(mask.any(dim=1), scores, torch.zeros_like(scores)).to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over the action positions of each row
    (mask (B, T)), skipping the others: delta_t = r_t + gamma V_next - V_t, A_t = delta_t + gamma lam A_next,
    where "next" is the row's next action (V = A = 0 after the last). Returns (advantages, returns =
    advantages + values), 0 off the mask."""
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        here = mask[:, t]
        advantages[:, t] = torch.where(here, adv, torch.zeros_like(adv))
        next_value = torch.where(here, values[:, t], next_value)
        next_adv = torch.where(here, adv, next_adv)
    return advantages, torch.where(mask, advantages + values, torch.zeros_like(values))


def whiten(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over all elements (ddof 0): PPO's advantage normalisation."""
    return (x - x.mean()) / (x.std(correction=0) + eps)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) for flat tensors of action
    tokens, and where the clip binds (the clipped term is the smaller one, so the token gets no gradient:
    ratio above 1 + eps with A > 0, or below 1 - eps with A < 0)."""
    ratio = (logp - old_logp).exp()
    loss = -torch.min(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    return loss, ((ratio > 1 + clip_eps) & (advantages > 0)) | ((ratio < 1 - clip_eps) & (advantages < 0))


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """Per-token 0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = old + clamp(V - old, -clip, clip)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
