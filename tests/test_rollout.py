import pytest
import torch
import torch.nn.functional as F

from model import Steer, Transformer
import rollout
from rollout import generate, sample_token
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_chat_model):
    return Transformer.from_pretrained(tiny_chat_model), Tokenizer.from_pretrained(tiny_chat_model)


def prompts_of(tok):
    return [tok.chat([{"role": "user", "content": q}]) for q in ("How many apples?", "Hi", "Explain the fox, step by step, please.")]


def vector_of(model, seed=5):
    return torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_by_recomputation(model, prompt, steps, vector=None, layer=None, coeff=0.0, steer_prompt=True):
    """The plain definition of greedy decoding: a full forward pass over the whole sequence for every token."""
    seq = list(prompt)
    for _ in range(steps):
        steer = None
        if vector is not None:
            mask = torch.tensor([[1.0 if (steer_prompt or i >= len(prompt)) else 0.0 for i in range(len(seq))]])
            steer = Steer(vector, layer, torch.tensor([coeff]), mask)
        seq.append(int(model(torch.tensor([seq]), steer=steer)[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("steer_prompt", [True, False])
def test_cached_greedy_equals_recomputation(tiny, steer_prompt):
    model, tok = tiny
    prompts, v = prompts_of(tok), vector_of(model)
    coeffs = [0.0, 1.5, -2.0, 3.0, 0.0, 1.0]  # two samples per prompt, a different intensity each
    r = generate(model, prompts, n=2, max_new_tokens=12, temperature=0, vector=v, layer=1, coeffs=coeffs, steer_prompt=steer_prompt)
    for row, c in enumerate(coeffs):
        want = greedy_by_recomputation(model, prompts[row // 2], 12, v, 1, c, steer_prompt)
        assert r.completion(row) == want
    unsteered = generate(model, prompts, max_new_tokens=12, temperature=0)
    for i, p in enumerate(prompts):
        assert unsteered.completion(i) == greedy_by_recomputation(model, p, 12)


def test_prompt_in_mixed_batch_equals_prompt_alone(tiny):
    model, tok = tiny
    prompts, v = prompts_of(tok), vector_of(model)
    batch = generate(model, prompts, max_new_tokens=10, temperature=0, vector=v, layer=2, coeffs=[0.0, 2.0, 0.0])
    for i, p in enumerate(prompts):
        alone = generate(model, [p], max_new_tokens=10, temperature=0, vector=v, layer=2, coeffs=[batch.coeffs[i].item()])
        assert batch.completion(i) == alone.completion(0)
    plain = generate(model, prompts[:1], max_new_tokens=10, temperature=0)
    assert batch.completion(0) == plain.completion(0)  # coefficient 0 is the unsteered model


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (20, 1.0), (0, 0.8)])
def test_logprobs_equal_a_full_forward_pass(tiny, top_k, top_p):
    model, tok = tiny
    prompts, v = prompts_of(tok), vector_of(model)
    T = 0.8
    r = generate(model, prompts, n=2, max_new_tokens=15, temperature=T, top_k=top_k, top_p=top_p, seed=3,
                 vector=v, layer=1, coeffs=[0.0, 1.0] * 3)
    with torch.no_grad():
        logits = model(r.tokens, positions=r.positions, padding_mask=r.padding_mask, steer=Steer(v, 1, r.coeffs))[:, :-1] / T
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[..., -1:], float("-inf"))
    if top_p < 1:
        probs = logits.softmax(-1)
        sp, order = probs.sort(-1, descending=True)
        drop = (sp.cumsum(-1) - sp) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    want = F.log_softmax(logits, -1).gather(-1, r.tokens[:, 1:, None]).squeeze(-1)
    mask = r.completion_mask[:, 1:]
    assert mask.sum() > 0
    assert (want[mask] - r.logprobs[:, 1:][mask]).abs().max().item() <= 1e-4
    assert torch.all(r.logprobs[~r.completion_mask] == 0)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.7)])
def test_sampled_frequencies_match_the_distribution(top_k, top_p, monkeypatch):
    """Inverse-CDF sampling draws each token with its probability (tempered, truncated), and never a
    token that top-k/top-p cut: 400k draws (100 calls on 4000 rows). Six tokens carry the mass, at
    the edges of sample_token's blocks (4 tokens here) in a vocabulary of 2.5 blocks, the last one padded."""
    monkeypatch.setattr(rollout, "SAMPLE_BLOCK", 4)
    V, where = 10, torch.tensor([0, 3, 4, 7, 8, 9])
    six = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -4.0])
    logits = torch.full((4000, V), -30.0).index_copy(1, where, six.repeat(4000, 1))  # the rest: probability < 1e-16 each
    T, draws = 0.8, 100
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V)
    for _ in range(draws):
        u = torch.rand(len(logits), dtype=torch.float64, generator=g)
        ids, logp = sample_token(logits.clone(), T, top_k, top_p, u)  # it overwrites its input
        counts += torch.bincount(ids, minlength=V)
    freq = counts / counts.sum()
    scaled = logits[0] / T
    if top_k:
        scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], float("-inf"))
    if top_p < 1:
        p = scaled.softmax(-1)
        sp, order = p.sort(descending=True)
        scaled = scaled.masked_fill(torch.zeros(V, dtype=torch.bool).scatter(0, order, sp.cumsum(-1) - sp >= top_p), float("-inf"))
    want = scaled.softmax(-1)
    assert (freq - want).abs().sum() / 2 < 0.005  # total variation; its sampling noise here is ~0.001
    assert torch.all(freq[want == 0] == 0)
    assert torch.allclose(logp, want.log()[ids])


def test_same_seed_same_samples(tiny):
    model, tok = tiny
    run = lambda seed: generate(model, prompts_of(tok), n=3, max_new_tokens=12, temperature=1.0, seed=seed).tokens
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_a_rows_sample_depends_on_its_seed_and_row_id_only(tiny):
    """What makes N processes sample what one process samples: the rows of prompt 1, sampled alone
    under their global row ids, equal the same rows sampled in the full batch."""
    model, tok = tiny
    prompts, v = prompts_of(tok), vector_of(model)
    kw = dict(max_new_tokens=12, temperature=1.0, seed=4, vector=v, layer=2)
    full = generate(model, prompts, n=2, coeffs=[0.0, 1.0] * 3, **kw)
    alone = generate(model, prompts[1:2], n=2, coeffs=[0.0, 1.0], row_ids=[2, 3], **kw)
    assert [full.completion(2), full.completion(3)] == [alone.completion(0), alone.completion(1)]
    assert full.completion(2) != full.completion(4)  # and other rows draw other numbers
    shifted = generate(model, prompts[1:2], n=2, coeffs=[0.0, 1.0], **kw)  # row ids 0, 1: other streams
    assert [shifted.completion(0), shifted.completion(1)] != [alone.completion(0), alone.completion(1)]


def test_stop_handling_and_completion_mask(tiny):
    model, tok = tiny
    prompts = prompts_of(tok)
    free = generate(model, prompts, max_new_tokens=8, temperature=0)
    assert free.finish_reasons == ["length"] * 3 and free.completion_lens.tolist() == [8, 8, 8]
    # stop on the very first token of row 0, and on the 4th token of row 2
    first, fourth = free.completion(0)[0], free.completion(2)[3]
    stops = [first, fourth]
    r = generate(model, prompts, max_new_tokens=8, temperature=0, stop_ids=stops)
    for i in range(3):
        ids, n = free.completion(i), int(r.completion_lens[i])
        cut = next((k + 1 for k, t in enumerate(ids) if t in stops), None)
        assert n == (cut or 8)
        assert r.finish_reasons[i] == ("stop" if cut else "length")
        assert r.completion(i) == ids[:n]  # the stop token is included, nothing after it
        P = r.prompt_width
        assert r.completion_mask[i, P:P + n].all() and not r.completion_mask[i, P + n:].any()
        assert torch.all(r.tokens[i, P + n:] == 0)
    assert r.completion_lens[0] == 1


def test_dropping_finished_rows_changes_nothing(tiny):
    model, tok = tiny
    prompts = prompts_of(tok)
    free = [generate(model, prompts, max_new_tokens=10, temperature=0).completion(i) for i in range(3)]
    # a token that ends some rows early and never appears in others
    stops = [next(t for t in free[0] + free[1] + free[2] if not all(t in f for f in free))]
    run = lambda fraction: generate(model, prompts, n=2, max_new_tokens=10, temperature=0, stop_ids=stops, compact_fraction=fraction)
    never, at_once = run(2.0), run(0.0)  # never drop finished rows / drop each as soon as it finishes
    assert 0 < at_once.finish_reasons.count("stop") < 6  # some rows were dropped while others went on
    assert torch.equal(never.tokens, at_once.tokens) and never.finish_reasons == at_once.finish_reasons


def test_rollouts_can_enter_a_backward_pass(tiny):
    """The decode loop runs in inference mode, whose tensors autograd refuses to save: none may leak into
    the returned rollouts, which the trainer multiplies with tensors that need gradients."""
    model, tok = tiny
    r = generate(model, prompts_of(tok), n=2, max_new_tokens=6, temperature=1.0, stop_ids=[5])
    assert not any(t.is_inference() for t in vars(r).values() if isinstance(t, torch.Tensor))
    logp, _ = rollout.completion_logprobs(model, r, torch.arange(6), temperature=1.0)
    (logp * r.logprobs[:, r.prompt_width:] * r.completion_mask[:, r.prompt_width:] * (1 + r.coeffs[:, None])).sum().backward()
    assert model.lm_head.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_too_long_prompt_is_a_clear_error(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        generate(model, [[1] * 500], max_new_tokens=20)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_non_finite_logits_are_named_with_the_row_not_an_index_error(tiny_chat_model, temperature):
    """Repro: weights that overflow made the inverse CDF index past the vocabulary (IndexError)."""
    model, tok = Transformer.from_pretrained(tiny_chat_model), Tokenizer.from_pretrained(tiny_chat_model)
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")  # one token's logit is NaN in every row
    with pytest.raises(rollout.NonFiniteLogits, match="non-finite logits at row 40, new token 0") as e:
        generate(model, prompts_of(tok)[:2], n=2, max_new_tokens=4, temperature=temperature, row_ids=[40, 41, 42, 43])
    assert e.value.row == 40 and e.value.position == 0
    with pytest.raises(ValueError, match="non-finite logits"):  # the sampler's own guard, below generate
        rollout.inverse_cdf_sample(torch.tensor([[0.0, float("inf"), 1.0]]), torch.tensor([0.5], dtype=torch.float64))


@pytest.mark.parametrize("bad", [dict(n=0), dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(max_new_tokens=-1)])
def test_bad_sampling_arguments_are_clear_errors(tiny, bad):
    model, tok = tiny
    with pytest.raises(ValueError, match="sampling needs"):
        generate(model, prompts_of(tok), **{"max_new_tokens": 4, **bad})


def test_parse_list_names_the_flag():
    assert rollout.parse_list("0,0.1,2", "--coeffs") == [0.0, 0.1, 2.0]
    assert rollout.parse_list("3,6", "--layers", int) == [3, 6]
    with pytest.raises(ValueError, match="--layers '3,x': expected comma-separated integers"):
        rollout.parse_list("3,x", "--layers", int)
    for bad in ("0,inf", "nan", "-inf,1"):
        with pytest.raises(ValueError, match=f"--coeffs '{bad}': every value must be a finite number"):
            rollout.parse_list(bad, "--coeffs")


def test_generate_refuses_a_steering_layer_outside_the_model(tiny):
    model, tok = tiny  # 4 blocks
    with pytest.raises(ValueError, match="steering layer 4 is outside the model's blocks 0..3"):
        generate(model, prompts_of(tok), max_new_tokens=2, vector=vector_of(model), layer=4, coeffs=[1.0] * 3)


@pytest.mark.parametrize("flags,message", [(["--top-p", "nan"], "--top-p nan: must be a finite number"),
                                           (["--temperature", "inf"], "--temperature inf: must be a finite number"),
                                           (["--coeffs", "0,inf"], "--coeffs '0,inf': every value must be a finite number")])
def test_side_by_side_cli_rejects_non_finite_flags(tiny_chat_model, monkeypatch, flags, message):
    from experiments import side_by_side

    monkeypatch.setattr("sys.argv", ["side_by_side.py", "--prompt", "Hi", "--model", tiny_chat_model, *flags])
    with pytest.raises(SystemExit) as e:
        side_by_side.main()
    assert str(e.value.code) == f"error: {message}"


def test_smollm2_greedy_equals_transformers_generate(smollm2):
    import transformers

    model, tok = Transformer.from_pretrained(smollm2), Tokenizer.from_pretrained(smollm2)
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in ("What is 17 + 25?", "Tell me a story about a cat.")]
    r = generate(model, prompts, max_new_tokens=32, temperature=0, stop_ids=tok.stop_ids)
    for i, p in enumerate(prompts):
        out = ref.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=tok.stop_ids, pad_token_id=0)
        assert r.completion(i) == out[0, len(p):].tolist()


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bf16 matmul in this oneDNN")
def test_smollm2_bf16_logprobs_stay_within_tolerance_of_fp32(smollm2):
    """--dtype bfloat16 samples with bf16 weight copies and scores under autocast. On SmolLM2 at the
    training temperature, per completion token, both stay within 0.1 mean and 1.0 max of fp32's
    log-probs (measured: about 0.03 and 0.3-0.4; bf16 keeps 8 bits of mantissa)."""
    from data.load import load_model_and_tokenizer
    from rollout import completion_logprobs

    model, tok = load_model_and_tokenizer(smollm2)
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in ("What is 12 * 7? Explain.", "Why is the sky blue?")]
    r = generate(model, prompts, n=2, max_new_tokens=32, temperature=0.5, seed=1, stop_ids=tok.stop_ids,
                 dtype=torch.bfloat16)
    P, rows = r.prompt_width, list(range(4))
    mask = r.completion_mask[:, P:]
    with torch.no_grad():
        fp32, _ = completion_logprobs(model, r, rows, 0.5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            learner, _ = completion_logprobs(model, r, rows, 0.5)
    for bf16 in (r.logprobs[:, P:], learner):  # the sampler's bf16 copies, the update's autocast
        gap = (bf16 - fp32).abs()[mask]
        assert 1e-3 < gap.mean().item() <= 0.1 and gap.max().item() <= 1.0  # fp32 itself: about 1e-5
