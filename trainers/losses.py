"""RL losses as pure functions of per-token log-probs (no model, no trainer state).

Shapes: `logprobs`, `ref_logprobs`, `old_logprobs`, `mask` are `[B, T]` (log-probs of the SAMPLED tokens; `mask` is 1
where a token is trained, 0 for padding and masked segments); `rewards` is `[B]`; the samples of one prompt are
contiguous, in groups of `group_size` (B = n_prompts * group_size).

Each loss has a per-sample form (`*_terms`) that takes precomputed baselines/advantages, so a trainer can split a
group across micro-batches; the group forms below are those terms averaged over the batch.
"""

from __future__ import annotations

import torch


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def group_baseline(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """r̄ per sample: the mean reward of its group, `[B]`."""
    groups = _groups(rewards, group_size)
    return groups.mean(dim=1, keepdim=True).expand_as(groups).reshape(-1)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: (r - mean of the group) / (std of the group + eps) if `scale`, else r - mean. `[B]`."""
    groups = _groups(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True, unbiased=group_size > 1) + eps)
    return centred.reshape(-1)


def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor, token_normalize: bool = False) -> torch.Tensor:
    """Σ_t mask·logprobs per sample (the log-probability of the trained tokens), or their mean if `token_normalize`."""
    total = (logprobs * mask).sum(dim=-1)
    return total / mask.sum(dim=-1).clamp(min=1) if token_normalize else total


def mirror_descent_terms(
    seq_logprobs: torch.Tensor, seq_ref_logprobs: torch.Tensor, advantages: torch.Tensor, tau: float
) -> torch.Tensor:
    """Per-sample k1.5 loss terms  −(r_j − r̄)·s_j + (τ/2)·(s_j − s_ref_j)²  (`advantages` = r_j − r̄), `[B]`."""
    return -advantages.detach() * seq_logprobs + 0.5 * tau * (seq_logprobs - seq_ref_logprobs.detach()) ** 2


def mirror_descent_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    tau: float,
    token_normalize: bool = False,
) -> torch.Tensor:
    """Kimi k1.5 online policy mirror descent (arXiv 2501.12599, §2.3.2, Eq. 3).

    For each problem, k = group_size responses are sampled from the iteration's reference policy π_θi; the gradient

        (1/k) Σ_j [ ∇_θ log π_θ(y_j, z_j | x) · (r(x, y_j, y*) − r̄)  −  (τ/2) ∇_θ (log π_θ(y_j, z_j | x) / π_θi(y_j, z_j | x))² ]

    is ascended, with r̄ the group's mean reward (the paper's practical stand-in for τ log Z). This returns the loss
    whose gradient is minus that, averaged over the batch:

        mean_j [ −(r_j − r̄)·s_j + (τ/2)·(s_j − s_ref_j)² ],   s_j = Σ_t mask·logprobs,  s_ref_j = Σ_t mask·ref_logprobs

    (sequence level, as written in the paper). `token_normalize=True` uses the per-token means instead of sums, which
    keeps the scale independent of response length (an option; the paper does not specify normalisation)."""
    s = sequence_logprobs(logprobs, mask, token_normalize)
    s_ref = sequence_logprobs(ref_logprobs, mask, token_normalize)
    advantages = rewards - group_baseline(rewards, group_size)
    return mirror_descent_terms(s, s_ref, advantages, tau).mean()


def grpo_token_terms(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_epsilon: float = 0.2,
    clip_epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token GRPO loss `[B, T]`:  −min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A) + β·KL_k3,  ρ = exp(logprobs − old_logprobs),
    KL_k3 = exp(ref − logprobs) − (ref − logprobs) − 1 (Schulman's unbiased estimator, as in DeepSeekMath)."""
    advantages = advantages.detach().unsqueeze(-1)
    ratio = torch.exp(logprobs - old_logprobs.detach())
    high = clip_epsilon if clip_epsilon_high is None else clip_epsilon_high
    loss = -torch.min(ratio * advantages, ratio.clamp(1 - clip_epsilon, 1 + high) * advantages)
    if beta:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs ref_logprobs (the frozen reference policy's log-probs)")
        delta = ref_logprobs.detach() - logprobs
        loss = loss + beta * (torch.exp(delta) - delta - 1)
    return loss


def aggregate(token_losses: torch.Tensor, mask: torch.Tensor, aggregation: str = "sequence_mean") -> torch.Tensor:
    """`sequence_mean`: mean over each sample's trained tokens, then over samples (GRPO); `token_mean`: mean over all
    trained tokens of the batch (DAPO)."""
    if aggregation == "sequence_mean":
        return ((token_losses * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if aggregation == "token_mean":
        return (token_losses * mask).sum() / mask.sum().clamp(min=1)
    raise ValueError(f"unknown aggregation {aggregation!r}: use 'sequence_mean' or 'token_mean'")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    clip_epsilon: float = 0.2,
    clip_epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    scale_rewards: bool = True,
    aggregation: str = "sequence_mean",
) -> torch.Tensor:
    """GRPO (DeepSeekMath, arXiv 2402.03300, Eq. 3; the DeepSeek-R1 recipe):

        J = E[ (1/G) Σ_i (1/|o_i|) Σ_t { min(ρ_i,t Â_i,t, clip(ρ_i,t, 1−ε, 1+ε) Â_i,t) − β D_KL[π_θ || π_ref] } ],
        Â_i,t = (r_i − mean(r)) / std(r)  (outcome supervision, one value per response),

    returned as −J. `clip_epsilon_high` decouples the upper clip (DAPO "clip-higher"); `scale_rewards=False` drops
    the std division (Dr. GRPO); `aggregation="token_mean"` averages over all tokens of the batch (DAPO)."""
    advantages = group_advantages(rewards, group_size, scale=scale_rewards)
    token_losses = grpo_token_terms(
        logprobs, old_logprobs, advantages, clip_epsilon, clip_epsilon_high, beta, ref_logprobs
    )
    return aggregate(token_losses, mask, aggregation)
