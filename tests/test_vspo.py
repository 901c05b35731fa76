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
