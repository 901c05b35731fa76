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
SCHEDULES = ("stratified", "random", "anneal", "adaptive")
NORMALIZATIONS = ("sum", "separate")
OVERLONG = ("none", "mask", "soft")


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
    adaptive:   stratified over the set as `adapt_intensities` last moved it (the caller passes the
                current levels).
    """
    values = torch.tensor(intensities, dtype=torch.float32)
    if kind in ("stratified", "adaptive"):
        return values[torch.arange(group_size) % len(values)]
    if kind == "random":
        return values[torch.randint(len(values), (group_size,), generator=generator)]
    if kind == "anneal":
        return values[torch.arange(group_size) % len(values)] * max(0.0, 1.0 - step / max(1, total_steps - 1))
    raise ValueError(f"unknown intensity schedule {kind!r}; choose from {', '.join(SCHEDULES)}")


ADAPT_DOWN, ADAPT_UP = 0.8, 1.1  # how far one step moves a level
ADAPT_BOUNDS = (0.25, 2.0)  # a level stays within these multiples of its starting value


def adapt_intensities(levels, start, behavior_by_level, truncated_by_level):
    """--schedule adaptive: the next step's intensities from this step's outcome at each level.

    levels: the current intensities, increasing, levels[0] = 0 (the unsteered rows); start: their
    values at step 0; behavior_by_level, truncated_by_level: each level's behaviour rate and
    truncated fraction this step. A steered level is lowered (x0.8) when more than half its rows run
    past the token budget, or when it shows the behaviour less often than the level below it (steering
    that has stopped making the rewarded behaviour common: the bandit's misaligned regime). It is
    raised (x1.1) while the unsteered rows show the behaviour in less than half their samples and
    its own rows are rarely cut off (under a quarter). Each level stays within ADAPT_BOUNDS of its
    start and at or above the level below it. Fixed intensities that suited the initial policy push
    a policy that has grown longer past the budget; this follows the policy, as `anneal` cannot."""
    new = [0.0]
    for k in range(1, len(levels)):
        level = levels[k]
        if truncated_by_level[k] > 0.5 or behavior_by_level[k] < behavior_by_level[k - 1]:
            level *= ADAPT_DOWN
        elif behavior_by_level[0] < 0.5 and truncated_by_level[k] < 0.25:
            level *= ADAPT_UP
        low, high = (start[k] * b for b in ADAPT_BOUNDS)
        new.append(max(new[-1], min(high, max(low, level))))
    return new


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


def composite_advantages(components, weights, group_size, normalization="sum", scale="std", eps=1e-4):
    """(K, N) reward components (accuracy, behaviour, a length penalty ...), (K,) weights -> (N,)
    advantages, (K,) the summed |advantage| each component carries (divide by their total for its
    share), and the number of groups whose composite reward has no spread.

    sum:      normalise the weighted sum within each group: GRPO on the composite reward, where a
              component with a large spread (the behaviour, across intensities) dominates the
              group's std and so shrinks the others' share.
    separate: normalise each component within each group on its own, then take the weighted sum
              (GDPO; TRL's multi_objective_aggregation="normalize_then_sum"): accuracy keeps its
              full weight in every group where correctness varies; a component with no spread in a
              group contributes 0 there.
    The magnitudes split |advantage| by component: in `sum`, component k's part of the centred sum,
    divided by the group's std."""
    r = components.float().view(len(components), -1, group_size)  # (K, groups, G)
    w = torch.as_tensor(weights, dtype=torch.float32).view(-1, 1, 1)
    if normalization == "sum":
        both = (r * w).sum(0)  # (groups, G): the composite reward
        total, zero_spread = group_advantages(both.flatten(), group_size, scale, eps)
        spread = both.std(-1, keepdim=True) + eps if scale == "std" else torch.ones_like(both[..., :1])
        parts = (r - r.mean(-1, keepdim=True)) * w / spread  # (K, groups, G)
        parts = torch.where((both.max(-1).values == both.min(-1).values)[None, :, None], 0.0, parts)
    elif normalization == "separate":
        parts = torch.stack([group_advantages(c.flatten(), group_size, scale, eps)[0].view(c.shape)
                             for c in r]) * w
        total = parts.sum(0).flatten()
        zero_spread = int((r.amax(-1) == r.amin(-1)).all(0).sum())
    else:
        raise ValueError(f"unknown reward normalization {normalization!r}; choose from "
                         f"{', '.join(NORMALIZATIONS)}")
    return total, parts.abs().sum((1, 2)), zero_spread


def overlong_penalty(lengths, max_new_tokens, window):
    """DAPO's soft overlong punishment (Yu et al. 2025): 0 up to max_new_tokens - window tokens, then a
    penalty falling linearly to -1 at the budget, so that answers learn to end before the cut-off
    rather than learning nothing from rows that all hit it. (N,) lengths -> (N,) in [-1, 0]."""
    start = max_new_tokens - window
    return ((start - lengths.float()) / window).clamp(-1.0, 0.0)


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
