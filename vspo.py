"""
The group-relative policy loss: GRPO, its common variants, and what VSPO changes.

Pure tensor math on (rows, time) tensors: nothing here samples, tokenizes or loads a
model, so a fork that tries a new loss touches this file only. The order of one step:

    coeffs     = intensity_schedule(...)            # VSPO: one steering intensity per rollout
    (sample rollouts at those intensities, score them: rollout.py, rewards.py)
    advantages = group_advantages(rewards, G)       # Shao et al. 2024 (GRPO), eq. for A_i
    weights    = truncated_is_weights(...)          # only with old_logprobs="steered"
    loss       = policy_loss(logprobs, old_logprobs, advantages, mask, normalizer, ...)

What makes it VSPO rather than GRPO is only *where the rollouts come from*: the G
rollouts of a group are sampled at different steering intensities, and all of them are
scored, normalised together and used to update the unsteered policy. Reward-shaped GRPO
is the same code with every intensity 0.
"""

import torch

AGGREGATIONS = ("seq_mean", "token_mean", "fixed")
SCHEDULES = ("stratified", "random", "anneal")


# -----------------------------------------------------------------------------
# VSPO: which intensity each rollout of a group is sampled at


def intensity_schedule(kind, intensities, group_size, step=0, total_steps=1, generator=None):
    """(G,) steering intensities for the rollouts of one group.

    stratified: cycle through the set, so each intensity gets G/K rollouts (the default: every group
                mixes unsteered and steered samples, which is what gives the group spread);
    random:     an independent draw from the set per rollout;
    anneal:     stratified, with the set scaled by 1 - step/(total_steps - 1): steering fades out
                linearly, from the full set at step 0 to intensity 0 at the last step (total_steps - 1),
                which samples the plain policy. (Our choice: the paper's abstract does not say whether
                intensities are fixed.)
    """
    values = torch.tensor(intensities, dtype=torch.float32)
    if kind == "stratified":
        return values[torch.arange(group_size) % len(values)]
    if kind == "random":
        return values[torch.randint(len(values), (group_size,), generator=generator)]
    if kind == "anneal":
        return values[torch.arange(group_size) % len(values)] * max(0.0, 1.0 - step / max(1, total_steps - 1))
    raise ValueError(f"unknown intensity schedule {kind!r}; choose from {', '.join(SCHEDULES)}")


# -----------------------------------------------------------------------------
# advantages


def group_advantages(rewards, group_size, scale="std", eps=1e-4):
    """(N,) rewards, groups of G consecutive rows -> (N,) advantages, number of zero-spread groups.

    scale="std": (r - mean) / (std + eps), GRPO's normalisation (std with Bessel's correction, as in
    TRL); scale="none": r - mean, Dr. GRPO's (Liu et al. 2025), which does not up-weight groups whose
    rewards barely differ. A group whose rewards are all equal carries no signal: its advantages are
    exactly 0 and it is counted, since a high count is the sparsity VSPO is meant to cure.
    """
    r = rewards.float().view(-1, group_size)  # (groups, G)
    centred = r - r.mean(1, keepdim=True)
    zero_spread = (r.max(1).values == r.min(1).values)
    if scale == "std":
        adv = centred / (r.std(1, keepdim=True) + eps)
    elif scale == "none":
        adv = centred
    else:
        raise ValueError(f"unknown advantage scale {scale!r}; choose std or none")
    adv = torch.where(zero_spread[:, None], torch.zeros_like(adv), adv)
    return adv.flatten(), int(zero_spread.sum())


# -----------------------------------------------------------------------------
# the loss


def loss_normalizer(mask, aggregation, max_new_tokens=None):
    """The denominator of the loss, computed once on the *whole* batch before micro-batching, so that
    summing micro-batch losses gives exactly the full-batch loss and gradient.

    seq_mean   (GRPO):     each sequence's mean token loss, averaged over sequences -> N
    token_mean (DAPO):     every token weighs the same -> total completion tokens
    fixed      (Dr. GRPO): a constant N * max_new_tokens, free of any length bias
    """
    if aggregation == "seq_mean":
        return float(mask.size(0))
    if aggregation == "token_mean":
        return float(mask.sum().clamp(min=1))
    if aggregation == "fixed":
        if max_new_tokens is None:
            raise ValueError("aggregation 'fixed' needs max_new_tokens")
        return float(mask.size(0) * max_new_tokens)
    raise ValueError(f"unknown aggregation {aggregation!r}; choose from {', '.join(AGGREGATIONS)}")


def truncated_is_weights(old_logprobs, sampler_logprobs, mask, cap=2.0):
    """Per-token min(pi_old(y_t) / pi_alpha(y_t), cap): corrects for rollouts sampled from the *steered*
    policy pi_alpha when the objective is the unsteered policy's (truncated importance sampling,
    Ionides 2008; the same device as TIS for sampler/trainer mismatch). Detached: a weight, not a path."""
    w = (old_logprobs - sampler_logprobs).clamp(max=20.0).exp().clamp(max=cap)
    return torch.where(mask, w, torch.zeros_like(w)).detach()


def policy_loss(logprobs, old_logprobs, advantages, mask, normalizer, aggregation="seq_mean", clip_low=0.2,
                clip_high=0.2,
                ref_logprobs=None, beta=0.0, is_weights=None):
    """The clipped surrogate (Schulman et al. 2017) on token log-probs, plus beta * KL to a reference.

    logprobs (N, T): log pi_theta(y_t) of the policy being trained (the *unsteered* model in VSPO).
    old_logprobs (N, T): of the policy that the ratio is taken against (detached).
    advantages (N,): one per sequence, shared by its tokens. mask (N, T): completion tokens.
    clip_low/clip_high: ratio clipped to [1 - low, 1 + high] (DAPO's clip-higher when high > low).
    ref_logprobs, beta: the k3 estimator of KL(pi_theta || pi_ref) (Schulman 2020), per token.
    is_weights (N, T): optional per-token weights (see truncated_is_weights).
    Returns (loss, stats); loss is this batch's share of the full-batch loss (see loss_normalizer).
    """
    mask = mask.float()
    ratio = (logprobs - old_logprobs.detach()).exp()
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights
    kl = None
    if beta > 0:
        log_r = ref_logprobs.detach() - logprobs
        kl = log_r.exp() - log_r - 1.0  # k3: unbiased, always >= 0
        per_token = per_token + beta * kl
    if aggregation == "seq_mean":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / normalizer
    else:
        loss = (per_token * mask).sum() / normalizer
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        # a token is clipped when the clipped branch is the one the minimum takes, so its gradient is 0:
        # the ratio past 1 + clip_high with a positive advantage, or below 1 - clip_low with a negative one
        # (as TRL and verl count it). A ratio past the bound on the other side keeps its full gradient.
        binds = ((ratio > 1.0 + clip_high) & (adv > 0)) | ((ratio < 1.0 - clip_low) & (adv < 0))
        stats = {"clip_frac": (binds.float() * mask).sum().item() / n.item(),
                 "ratio_mean": (ratio * mask).sum().item() / n.item(),
                 "kl": (kl * mask).sum().item() / n.item() if kl is not None else 0.0}
    return loss, stats


# -----------------------------------------------------------------------------
# the distillation baseline


def sft_loss(logprobs, keep, mask, normalizer, aggregation="seq_mean"):
    """Teacher-trace distillation, the paper's baseline (train.py --algo distill): the negative
    log-likelihood of the kept traces (keep (N,) bool: those that earn the behaviour), under the same
    normaliser and averaging as policy_loss, so that one learning rate means the same for both.
    Rows not kept contribute nothing (and get no gradient)."""
    mask = (mask & keep[:, None]).float()
    nll = -logprobs * mask
    if aggregation == "seq_mean":
        return (nll.sum(1) / mask.sum(1).clamp(min=1)).sum() / normalizer
    return nll.sum() / normalizer
