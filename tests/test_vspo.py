import math

import pytest
import torch

import vspo


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv, zero = vspo.group_advantages(r, group_size=4)
    std = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected std of [1, 0, 0, 1]
    want = 0.5 / (std + 1e-4)
    assert torch.allclose(adv[:4], torch.tensor([want, -want, -want, want]))
    assert torch.equal(adv[4:], torch.zeros(4)) and zero == 1  # no spread: no signal, and counted
    adv, zero = vspo.group_advantages(r, group_size=4, scale="none")
    assert torch.equal(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])) and zero == 1
    with pytest.raises(ValueError, match="std or none"):
        vspo.group_advantages(r, 4, scale="rank")


# two rows, three tokens: ratios [1.5, 0.5, 1.0] and [1.5, 0.5, (masked)], advantages +1 and -1
LOGP = torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]]))
OLD = torch.zeros(2, 3)
ADV = torch.tensor([1.0, -1.0])
MASK = torch.tensor([[True, True, True], [True, True, False]])
# per-token -min(r A, clip(r) A) with clip [0.8, 1.2]: row 0 [-1.2, -0.5, -1.0], row 1 [1.5, 0.8, -]


@pytest.mark.parametrize("aggregation,want", [("seq_mean", (-2.7 / 3 + 2.3 / 2) / 2), ("token_mean", -0.4 / 5), ("fixed", -0.4 / 8)])
def test_clipped_surrogate_by_hand(aggregation, want):
    norm = vspo.loss_normalizer(MASK, aggregation, max_new_tokens=4)
    loss, stats = vspo.policy_loss(LOGP, OLD, ADV, MASK, norm, aggregation)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    # the clip binds on row 0's ratio 1.5 (A > 0) and row 1's ratio 0.5 (A < 0); row 0's 0.5 and row 1's 1.5
    # are past a bound too, but on the side where the unclipped branch is the minimum
    assert stats["clip_frac"] == pytest.approx(2 / 5)


def test_clip_frac_counts_exactly_the_tokens_without_gradient():
    g = torch.Generator().manual_seed(0)
    logp = (0.5 * torch.randn(6, 20, generator=g)).requires_grad_()
    adv, mask = torch.randn(6, generator=g), torch.ones(6, 20, dtype=torch.bool)
    loss, stats = vspo.policy_loss(logp, torch.zeros(6, 20), adv, mask, 1.0, "token_mean")
    loss.backward()
    assert 0 < stats["clip_frac"] < 1
    assert stats["clip_frac"] == pytest.approx((logp.grad == 0).float().mean().item())


def test_clip_higher_widens_only_the_upper_side():
    norm = vspo.loss_normalizer(MASK, "token_mean")
    loss, _ = vspo.policy_loss(LOGP, OLD, ADV, MASK, norm, "token_mean", clip_low=0.2, clip_high=0.6)
    # row 0 token 0 is now unclipped (1.5 < 1.6): -1.5 instead of -1.2
    assert loss.item() == pytest.approx((-1.5 - 0.5 - 1.0 + 1.5 + 0.8) / 5, abs=1e-6)


def test_k3_kl_by_hand():
    logp = torch.log(torch.full((1, 2), 0.5))
    ref = torch.log(torch.full((1, 2), 0.25))
    mask = torch.ones(1, 2, dtype=torch.bool)
    k3 = 0.5 - math.log(0.5) - 1  # r = ref/pi = 0.5: r - log r - 1
    loss, stats = vspo.policy_loss(logp, logp.detach(), torch.zeros(1), mask, 1.0, "seq_mean", ref_logprobs=ref, beta=0.1)
    assert stats["kl"] == pytest.approx(k3) and loss.item() == pytest.approx(0.1 * k3)


def test_policy_gradient_at_ratio_one():
    logp = torch.randn(2, 3, requires_grad=True)
    loss, _ = vspo.policy_loss(logp, logp.detach(), ADV, MASK, vspo.loss_normalizer(MASK, "seq_mean"), "seq_mean")
    loss.backward()
    want = torch.tensor([[-1 / 3, -1 / 3, -1 / 3], [1 / 2, 1 / 2, 0.0]]) / 2  # -A / len / N on completion tokens
    assert torch.allclose(logp.grad, want)


@pytest.mark.parametrize("aggregation", vspo.AGGREGATIONS)
def test_micro_batches_give_the_full_batch_gradient(aggregation):
    g = torch.Generator().manual_seed(0)
    N, T = 8, 6
    base = torch.randn(N, T, generator=g)
    old, ref = base + 0.1 * torch.randn(N, T, generator=g), base + 0.1 * torch.randn(N, T, generator=g)
    adv = torch.randn(N, generator=g)
    mask = torch.rand(N, T, generator=g) > 0.3
    mask[:, 0] = True
    norm = vspo.loss_normalizer(mask, aggregation, max_new_tokens=T)
    kw = dict(aggregation=aggregation, ref_logprobs=ref, beta=0.05)
    full = base.clone().requires_grad_()
    vspo.policy_loss(full, old, adv, mask, norm, **kw)[0].backward()
    micro = base.clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 3), slice(3, 5), slice(5, 8)):  # uneven micro-batches
        kw_rows = dict(kw, ref_logprobs=ref[rows])
        loss, _ = vspo.policy_loss(micro[rows], old[rows], adv[rows], mask[rows], norm, **kw_rows)
        loss.backward()
        total += loss.item()
    assert torch.allclose(full.grad, micro.grad, atol=1e-7)
    full_loss = vspo.policy_loss(base, old, adv, mask, norm, **kw)[0].item()
    assert total == pytest.approx(full_loss, abs=1e-6)


def test_intensity_schedules():
    assert vspo.intensity_schedule("stratified", [0.0, 0.5, 1.0], 6).tolist() == [0.0, 0.5, 1.0, 0.0, 0.5, 1.0]
    # the training loop passes steps 0 .. steps - 1: full intensities first, the plain policy at the last step
    anneal = lambda step: vspo.intensity_schedule("anneal", [0.0, 0.5, 1.0], 3, step=step, total_steps=16).tolist()
    assert anneal(0) == [0.0, 0.5, 1.0] and anneal(15) == [0.0, 0.0, 0.0]
    assert anneal(5) == pytest.approx([0.0, 0.5 * 2 / 3, 2 / 3])
    assert vspo.intensity_schedule("anneal", [0.0, 1.0], 2, step=0, total_steps=1).tolist() == [0.0, 1.0]
    draw = lambda seed: vspo.intensity_schedule("random", [0.0, 0.5, 1.0], 16, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1)) and set(draw(1).tolist()) <= {0.0, 0.5, 1.0}
    assert not torch.equal(draw(1), draw(2))
    with pytest.raises(ValueError, match="stratified, random, anneal"):
        vspo.intensity_schedule("cosine", [0.0], 2)


def test_truncated_is_weights():
    old = torch.log(torch.tensor([[0.5, 0.9, 0.1]]))
    sampled = torch.log(torch.tensor([[0.25, 0.3, 0.1]]))
    mask = torch.tensor([[True, True, False]])
    w = vspo.truncated_is_weights(old, sampled, mask, cap=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 2.0, 0.0]]))  # 0.5/0.25 = 2, 0.9/0.3 = 3 -> capped at 2, masked -> 0
    w = vspo.truncated_is_weights(sampled, old, mask, cap=2.0)
    assert torch.allclose(w, torch.tensor([[0.5, 1 / 3, 0.0]]))


def test_unknown_aggregation_is_an_error():
    with pytest.raises(ValueError, match="seq_mean, token_mean, fixed"):
        vspo.loss_normalizer(MASK, "sum")


def test_sft_loss_learns_only_the_kept_traces():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.5], [0.5, 0.5, 0.5]])).requires_grad_()
    keep = torch.tensor([True, False])
    loss = vspo.sft_loss(logp, keep, MASK, normalizer=8.0, aggregation="fixed")
    assert loss.item() == pytest.approx(-(math.log(0.5) * 2 + math.log(0.25)) / 8)
    loss.backward()
    assert torch.equal(logp.grad[1], torch.zeros(3)) and (logp.grad[0] < 0).all()
    per_seq = vspo.sft_loss(logp, keep, MASK, normalizer=2.0, aggregation="seq_mean")
    assert per_seq.item() == pytest.approx(-(math.log(0.5) * 2 + math.log(0.25)) / 3 / 2)


# -----------------------------------------------------------------------------
# issue 29's knobs: how the reward's parts are combined, the length penalty, adaptive intensities


def test_sum_normalization_is_grpo_on_the_composite_and_splits_its_magnitude_by_part():
    acc = torch.tensor([1.0, 0.0, 0.0, 0.0])
    beh = torch.tensor([0.0, 0.0, 1.0, 1.0])
    adv, magnitude, zero = vspo.composite_advantages(torch.stack([acc, beh]), [1.0, 2.0], 4, "sum")
    want, _ = vspo.group_advantages(acc + 2 * beh, 4)  # r = [1, 0, 2, 2]: mean 1.25, std 0.957
    assert torch.allclose(adv, want) and zero == 0
    std = math.sqrt(((1 - 1.25) ** 2 + 1.25 ** 2 + 2 * 0.75 ** 2) / 3) + 1e-4
    acc_part = (acc - 0.25).abs().sum() / std  # |0.75| + 3 |-0.25| = 1.5
    beh_part = 2 * (beh - 0.5).abs().sum() / std  # 2 x 4 x 0.5 = 4
    assert torch.allclose(magnitude, torch.tensor([acc_part, beh_part]), rtol=1e-5)


def test_separate_normalization_gives_each_part_its_own_scale_and_no_spread_no_share():
    # group 1: accuracy varies a little, the behaviour a lot; group 2: only the behaviour varies
    acc = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    beh = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    adv, magnitude, zero = vspo.composite_advantages(torch.stack([acc, beh]), [1.0, 0.5], 4, "separate")
    a_acc, _ = vspo.group_advantages(acc, 4)
    a_beh, _ = vspo.group_advantages(beh, 4)
    assert torch.allclose(adv, a_acc + 0.5 * a_beh) and zero == 0
    assert torch.equal(a_acc[4:], torch.zeros(4))  # accuracy has no spread in group 2: it contributes 0
    # by hand: accuracy [1, 0, 0, 0] has mean 0.25 and std 0.5, so the correct answer's part is 1.5
    assert adv[0].item() == pytest.approx(0.75 / (0.5 + 1e-4) + 0.5 * (-0.5 / (math.sqrt(1 / 3) + 1e-4)))
    assert torch.allclose(magnitude, torch.tensor([a_acc.abs().sum(), 0.5 * a_beh.abs().sum()]))
    flat = torch.ones(8)
    _, magnitude, zero = vspo.composite_advantages(torch.stack([flat, flat]), [1.0, 1.0], 4, "separate")
    assert zero == 2 and torch.equal(magnitude, torch.zeros(2))
    with pytest.raises(ValueError, match="sum, separate"):
        vspo.composite_advantages(torch.stack([flat]), [1.0], 4, "rank")


def test_the_overlong_penalty_ramps_to_minus_one_at_the_budget():
    lengths = torch.tensor([10, 320, 321, 352, 384])
    assert torch.equal(vspo.overlong_penalty(lengths, 384, 64), torch.tensor([0.0, 0.0, -1 / 64, -0.5, -1.0]))


def test_adaptive_intensities_follow_the_outcome_at_each_level():
    start = [0.0, 0.1, 0.2]
    # the unsteered rows lack the behaviour and the steered ones stop in time: both levels go up
    assert vspo.adapt_intensities(start, start, [0.0, 0.2, 0.4], [0.0, 0.0, 0.1]) == pytest.approx([0, 0.11, 0.22])
    # the top level overshoots the budget: it comes down; the middle one still goes up
    assert vspo.adapt_intensities(start, start, [0.0, 0.3, 0.1], [0.0, 0.1, 0.9]) == pytest.approx([0, 0.11, 0.16])
    # a level that shows the behaviour less than the level below it is lowered too (the top one, above
    # it, goes on rising)
    assert vspo.adapt_intensities(start, start, [0.4, 0.2, 0.3], [0.0, 0.0, 0.0]) == pytest.approx([0, 0.08, 0.22])
    # bounds: never below a quarter or above twice the start, never below the level beneath
    low = [0.0, 0.025, 0.05]
    assert vspo.adapt_intensities(low, start, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]) == pytest.approx([0, 0.025, 0.05])
    high = [0.0, 0.2, 0.4]
    assert vspo.adapt_intensities(high, start, [0.0, 0.5, 0.6], [0.0, 0.0, 0.0]) == pytest.approx([0, 0.2, 0.4])
    assert vspo.adapt_intensities([0.0, 0.19, 0.19], start, [0.0, 0.5, 0.6], [0.0, 0.0, 0.9]) == pytest.approx(
        [0, 0.2, 0.2])  # the top level's 0.152 is lifted to the middle one's 0.2 (raised from 0.19, capped)
    assert torch.equal(vspo.intensity_schedule("adaptive", [0.0, 0.11, 0.2], 6), torch.tensor([0.0, 0.11, 0.2] * 2))
