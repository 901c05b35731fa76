import json
import os
import shutil
from contextlib import nullcontext

import pytest
import torch

from conftest import VOCAB, write_hf_checkpoint
from model import CheckpointError, KVCache, Linear, Steer, Transformer

KINDS = ("gpt2", "llama", "qwen2", "qwen3", "mistral")


def tokens(B=2, T=20, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# parity with transformers


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(tiny_checkpoints, kind):
    path, ref = tiny_checkpoints[kind]
    model = Transformer.from_pretrained(path)
    x = tokens()
    with torch.no_grad():
        diff = (model(x) - ref(x).logits).abs().max().item()
    assert diff <= 1e-4


def test_smollm2_greedy_next_tokens_match_transformers(smollm2):
    import transformers

    from tokenizer import Tokenizer

    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    model = Transformer.from_pretrained(smollm2)
    tok = Tokenizer.from_pretrained(smollm2)
    for q in ("What is 17 + 25?", "Name three colours.", "Write a haiku about the sea."):
        x = torch.tensor([tok.chat([{"role": "user", "content": q}])])
        with torch.no_grad():
            ours, theirs = model(x), ref(x).logits
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))  # the greedy next token at every position
        assert (ours - theirs).abs().max().item() <= 1e-3


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    write_hf_checkpoint("llama", single)
    write_hf_checkpoint("llama", sharded, max_shard_size="60KB")
    assert os.path.isfile(sharded / "model.safetensors.index.json")
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    x = tokens()
    with torch.no_grad():
        assert torch.equal(Transformer.from_pretrained(str(single))(x), Transformer.from_pretrained(str(sharded))(x))


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_loads_in_transformers(tiny_checkpoints, tmp_path, kind):
    import transformers

    model = Transformer.from_pretrained(tiny_checkpoints[kind][0])
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        assert (model(x) - reloaded(x).logits).abs().max().item() <= 1e-4
        assert torch.equal(model(x), Transformer.from_pretrained(str(tmp_path))(x))  # and round-trips exactly


def test_save_pretrained_copies_tokenizer_files(smollm2, tmp_path):
    Transformer.from_pretrained(smollm2).save_pretrained(tmp_path)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(tmp_path / name)


def test_bf16_load(tiny_checkpoints):
    model = Transformer.from_pretrained(tiny_checkpoints["llama"][0], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(tokens()).float()).all()


# -----------------------------------------------------------------------------
# positions, padding and the KV cache (what rollout.py builds on)


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_equals_each_prompt_alone(tiny_checkpoints, kind):
    model = Transformer.from_pretrained(tiny_checkpoints[kind][0])
    prompts = [tokens(1, 12, seed=1)[0], tokens(1, 7, seed=2)[0]]
    T = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), T, dtype=torch.long)
    padding_mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    positions = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, T - len(p):], padding_mask[i, T - len(p):] = p, True
        positions[i, T - len(p):] = torch.arange(len(p))
    with torch.no_grad():
        out = model(batch, positions=positions, padding_mask=padding_mask)
        for i, p in enumerate(prompts):
            alone = model(p[None])
            assert (out[i, T - len(p):] - alone[0]).abs().max().item() <= 1e-5


def packed(model):
    """How many Linear layers multiply with a prepacked weight right now, out of how many."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    return sum(m.use_packed for m in linears), len(linears)


@pytest.mark.parametrize("prepack", [False, True], ids=["plain", "prepacked"])
@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_decoding_equals_full_forward(tiny_checkpoints, kind, prepack):
    """Also with prepacked weights, as in the sampler's decode loop (gpt2 and qwen2 carry biases)."""
    model = Transformer.from_pretrained(tiny_checkpoints[kind][0])
    x = tokens(2, 16)
    with torch.no_grad():
        full = model(x)
        with model.prepacked() if prepack else nullcontext():
            n_packed, n_linear = packed(model)
            assert n_packed == (n_linear if prepack else 0)
            cache = KVCache(model.config, batch_size=2, max_len=16)
            steps = [model(x[:, :10], kv_cache=cache)] + [model(x[:, t:t + 1], kv_cache=cache) for t in range(10, 16)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5
    assert cache.pos == 16


def test_kv_cache_overflow_is_an_error(tiny_checkpoints):
    model = Transformer.from_pretrained(tiny_checkpoints["qwen2"][0])
    cache = KVCache(model.config, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(tokens(1, 5), kv_cache=cache)


# -----------------------------------------------------------------------------
# prepacked weights (the sampler's decode loop; see also the KV cache test above)


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_prepacked_is_off_after_the_block_and_never_stale(tiny_checkpoints, no_grad):
    """Also under inference mode, as in the sampler's decode loop."""
    model = Transformer.from_pretrained(tiny_checkpoints["llama"][0])
    x = tokens(2, 6)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), model.prepacked():
        raise RuntimeError("boom")
    assert packed(model)[0] == 0  # off even when the block raised
    optimizer = torch.optim.AdamW([model.layers[0].mlp.w_down.weight], lr=0.1)
    with no_grad():
        with model.prepacked():
            before = model(x)
        assert packed(model)[0] == 0
    kept = {name: m.packed for name, m in model.named_modules() if isinstance(m, Linear)}
    model(x).sum().backward()
    optimizer.step()  # a training step between two sampling blocks
    with no_grad():
        with model.prepacked():
            after = model(x)
            repacked = {name for name, m in model.named_modules() if isinstance(m, Linear) and m.packed is not kept[name]}
        assert repacked == {"layers.0.mlp.w_down"}  # only the weight that changed is packed again
        assert not torch.allclose(before, after)
        assert (after - model(x)).abs().max().item() <= 1e-5  # the packed path sees the new weights
        model.layers[1].attn.wo.weight.data = torch.randn_like(model.layers[1].attn.wo.weight)  # new storage, same version
        with model.prepacked():
            assert (model(x) - after).abs().max().item() > 1e-3
            assert model.layers[1].attn.wo.packed is not kept["layers.1.attn.wo"]


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bf16 matmul in this oneDNN")
@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: q/k/v biases, cast with their weights
def test_bf16_copies_match_autocast_and_are_refreshed_after_a_step(tiny_checkpoints, kind):
    """The sampler's bf16 weight copies compute what autocast computes (to bf16 rounding), and an
    optimizer step remakes exactly the copies of the weights it changed."""
    model = Transformer.from_pretrained(tiny_checkpoints[kind][0])
    x = tokens(2, 6)
    bf16 = torch.bfloat16

    def close_to_autocast():
        with torch.no_grad():
            with torch.autocast("cpu", dtype=bf16):
                want = model(x).float()
            with model.prepacked(bf16):
                got = model(x)
            exact = model(x)
        assert got.dtype == torch.float32 and packed(model)[0] == 0
        # bf16 has 8 bits of mantissa: both sit about as far from fp32, and as far from each other
        scale = exact.abs().max().item()
        assert (got - exact).abs().max().item() <= 0.05 * scale and (want - exact).abs().max().item() <= 0.05 * scale
        assert (got - want).abs().max().item() <= 0.05 * scale and (got - exact).abs().max().item() > 0
        return got

    before = close_to_autocast()
    kept = {name: m.packed for name, m in model.named_modules() if isinstance(m, Linear)}
    assert all(p.dtype == bf16 for p in kept.values())
    optimizer = torch.optim.AdamW([model.layers[0].mlp.w_down.weight, model.layers[1].attn.wqkv.weight], lr=0.1)
    model(x).sum().backward()
    optimizer.step()
    after = close_to_autocast()
    remade = {name for name, m in model.named_modules() if isinstance(m, Linear) and m.packed is not kept[name]}
    assert remade == {"layers.0.mlp.w_down", "layers.1.attn.wqkv"} and not torch.allclose(before, after)
    with torch.no_grad():  # back to fp32: every copy is made again, in fp32, and gives the plain logits
        plain = model(x)
        with model.prepacked():
            assert (model(x) - plain).abs().max().item() <= 1e-5 and all(
                m.packed.dtype == torch.float32 for m in model.modules() if isinstance(m, Linear))


def test_model_with_packed_weights_can_be_deep_copied(tiny_checkpoints):
    import copy

    model = Transformer.from_pretrained(tiny_checkpoints["llama"][0])
    x = tokens(2, 6)
    with torch.no_grad(), model.prepacked():
        want = model(x)
    twin = copy.deepcopy(model)  # e.g. the frozen reference policy, made after some sampling
    assert all(m.packed is None for m in twin.modules() if isinstance(m, Linear))
    with torch.no_grad(), twin.prepacked():
        assert torch.equal(twin(x), want)


def test_prepacked_keeps_gradients_and_autocast_working(tiny_checkpoints):
    """With grad enabled the packed copies (detached) are bypassed; under autocast nothing is packed."""
    model = Transformer.from_pretrained(tiny_checkpoints["qwen2"][0])
    x = tokens(2, 6)
    model(x).sum().backward()
    want = model.layers[0].attn.wqkv.weight.grad.clone()
    model.zero_grad()
    with model.prepacked():
        model(x).sum().backward()
    assert torch.allclose(model.layers[0].attn.wqkv.weight.grad, want, atol=1e-6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), model.prepacked():
        assert packed(model)[0] == 0
        out = model(x)
    assert out.dtype == torch.bfloat16


# -----------------------------------------------------------------------------
# steering


def steer_vector(model, seed=3):
    return torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
def test_zero_coefficient_is_bit_identical(tiny_checkpoints, kind):
    model = Transformer.from_pretrained(tiny_checkpoints[kind][0])
    x = tokens(3, 10)
    with torch.no_grad():
        plain = model(x)
        steered = model(x, steer=Steer(steer_vector(model), layer=1, coeff=torch.zeros(3)))
        nonzero = model(x, steer=Steer(steer_vector(model), layer=1, coeff=torch.ones(3)))
    assert torch.equal(plain, steered)
    assert not torch.allclose(plain, nonzero)  # the vector does act when the coefficient is not 0


def test_per_row_coefficients_equal_rows_alone(tiny_checkpoints):
    model = Transformer.from_pretrained(tiny_checkpoints["llama"][0])
    v, coeff = steer_vector(model), torch.tensor([0.0, 0.5, 2.0, -1.0])
    x = tokens(4, 10)
    with torch.no_grad():
        batch = model(x, steer=Steer(v, layer=2, coeff=coeff))
        for b in range(4):
            alone = model(x[b:b + 1], steer=Steer(v, layer=2, coeff=coeff[b:b + 1]))
            assert (batch[b] - alone[0]).abs().max().item() <= 1e-5
        assert torch.equal(batch[0], model(x)[0])  # the coefficient-0 row is the unsteered model, bit for bit


def test_steering_is_added_at_the_output_of_its_block(tiny_checkpoints):
    model = Transformer.from_pretrained(tiny_checkpoints["llama"][0])
    v, x = steer_vector(model), tokens(1, 8)
    with torch.no_grad():
        _, plain = model.hidden(x, read_layers=(0, 1, 2))
        _, steered = model.hidden(x, steer=Steer(v, layer=1, coeff=torch.tensor([2.0])), read_layers=(0, 1, 2))
    assert torch.equal(plain[0], steered[0])  # before the steered block: untouched
    assert torch.allclose(steered[1], plain[1] + 2.0 * v, atol=1e-6)  # exactly resid_post of block 1 plus coeff * v
    assert not torch.allclose(plain[2], steered[2])  # and it propagates


@pytest.mark.parametrize("layer", [-1, 3, 99])
def test_a_steering_layer_outside_the_model_is_an_error(tiny_checkpoints, layer):
    model = Transformer.from_pretrained(tiny_checkpoints["llama"][0])  # blocks 0..2
    with torch.no_grad(), pytest.raises(ValueError, match=f"steering layer {layer} is outside the model's blocks 0..2"):
        model(tokens(1, 4), steer=Steer(steer_vector(model), layer=layer, coeff=torch.ones(1)))


def test_residual_reads_match_transformers_hidden_states(tiny_checkpoints):
    path, ref = tiny_checkpoints["qwen2"]
    model = Transformer.from_pretrained(path)
    x = tokens()
    with torch.no_grad():
        _, reads = model.hidden(x, read_layers=(0, 1))
        hs = ref(x, output_hidden_states=True).hidden_states
    for layer in (0, 1):  # transformers' hidden_states[l + 1] is the output of block l
        assert (reads[layer] - hs[layer + 1]).abs().max().item() <= 1e-5


def test_steer_mask_under_kv_cache_steers_generated_positions_only(tiny_checkpoints):
    model = Transformer.from_pretrained(tiny_checkpoints["mistral"][0])
    v, x = steer_vector(model), tokens(2, 12)
    coeff = torch.tensor([1.5, 0.0])
    mask = torch.zeros(2, 12)
    mask[:, 8:] = 1  # prompt = first 8 tokens, unsteered
    with torch.no_grad():
        full = model(x, steer=Steer(v, layer=0, coeff=coeff, mask=mask))
        cache = KVCache(model.config, batch_size=2, max_len=12)
        out = [model(x[:, :8], kv_cache=cache, steer=Steer(v, layer=0, coeff=coeff, mask=mask[:, :8]))]
        for t in range(8, 12):
            out.append(model(x[:, t:t + 1], kv_cache=cache, steer=Steer(v, layer=0, coeff=coeff)))
        assert (torch.cat(out, 1) - full).abs().max().item() <= 1e-5
        assert torch.equal(full[:, :8], model(x)[:, :8])  # unsteered prompt positions


# -----------------------------------------------------------------------------
# bad checkpoints: one clear line each


def load_error(path):
    with pytest.raises(CheckpointError) as e:
        Transformer.from_pretrained(str(path))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def checkpoint_copy(tiny_checkpoints, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["llama"][0], dst)
    return dst


def rewrite_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")


def test_error_not_a_folder(tmp_path):
    assert "not a folder" in load_error(tmp_path / "nope")


def test_error_no_config(checkpoint_copy):
    os.remove(checkpoint_copy / "config.json")
    assert "config.json" in load_error(checkpoint_copy)


def test_error_unknown_model_type(checkpoint_copy):
    cfg = json.loads((checkpoint_copy / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (checkpoint_copy / "config.json").write_text(json.dumps(cfg))
    msg = load_error(checkpoint_copy)
    assert "'falcon'" in msg and "llama" in msg and "gpt2" in msg


def test_error_missing_tensor(checkpoint_copy):
    rewrite_tensors(checkpoint_copy, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in load_error(checkpoint_copy)


def test_error_unexpected_tensor(checkpoint_copy):
    rewrite_tensors(checkpoint_copy, lambda s: s.__setitem__("model.layers.9.extra.weight", torch.zeros(2)))
    msg = load_error(checkpoint_copy)
    assert "unexpected tensor model.layers.9.extra.weight" in msg and "model.safetensors" in msg


def test_error_wrong_shape(checkpoint_copy):
    rewrite_tensors(checkpoint_copy, lambda s: s.__setitem__("model.norm.weight", torch.ones(63)))
    msg = load_error(checkpoint_copy)
    assert "model.norm.weight" in msg and "(63,)" in msg and "(64,)" in msg


def test_error_missing_shard(tmp_path):
    write_hf_checkpoint("llama", tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.remove(tmp_path / shard)
    msg = load_error(tmp_path)
    assert shard in msg and "missing" in msg


def test_error_corrupt_safetensors_header(checkpoint_copy):
    data = (checkpoint_copy / "model.safetensors").read_bytes()
    (checkpoint_copy / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    msg = load_error(checkpoint_copy)
    assert "model.safetensors" in msg and "not a readable safetensors file" in msg


def test_error_pickle_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 1, "intermediate_size": 8, "vocab_size": 8}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    assert "never pickles" in load_error(tmp_path)


# -----------------------------------------------------------------------------
# hostile and damaged checkpoints: one line each, and nothing read from outside the folder


def test_a_shard_outside_the_checkpoint_folder_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    write_hf_checkpoint("llama", ckpt, max_shard_size="60KB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.makedirs(tmp_path / "elsewhere")
    shutil.move(ckpt / shard, tmp_path / "elsewhere" / shard)  # a valid shard, outside the folder
    for name in (f"../elsewhere/{shard}", str(tmp_path / "elsewhere" / shard)):
        index["weight_map"] = {k: (name if v == shard else v) for k, v in index["weight_map"].items()}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
        assert f"shard {name!r} is not a file inside the checkpoint folder" in load_error(ckpt)
        shard = name


@pytest.mark.parametrize("edit,field", [
    (dict(hidden_size=0), "hidden_size must be a positive integer, got 0"),
    (dict(num_hidden_layers=-2), "num_hidden_layers must be a positive integer"),
    (dict(intermediate_size="96"), "intermediate_size must be a positive integer, got '96'"),
    (dict(vocab_size=3.5), "vocab_size must be a positive integer"),
    (dict(num_key_value_heads=3), "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (dict(head_dim=15), "head_dim 15 is odd"),
    (dict(rms_norm_eps=0), "rms_norm_eps must be a positive finite number"),
    (dict(rope_theta=-1.0), "rope_theta must be a positive finite number"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "missing field 'low_freq_factor'"),
    (dict(max_position_embeddings=True), "max_position_embeddings must be a positive integer, got True"),
    (dict(num_hidden_layers=10**9), "1000000000 layers, but the weights"),
])
def test_bad_config_values_are_one_line_errors_naming_the_field(checkpoint_copy, edit, field):
    cfg = json.loads((checkpoint_copy / "config.json").read_text())
    cfg.pop("rope_parameters", None)  # transformers 5 writes rope_theta here; the edits use the 4.x fields
    cfg.update({"rope_theta": 500000.0, **edit})
    (checkpoint_copy / "config.json").write_text(json.dumps(cfg))
    assert field in load_error(checkpoint_copy)


def test_config_top_level_and_other_families(checkpoint_copy, tmp_path):
    (checkpoint_copy / "config.json").write_text("[1, 2]")
    assert "the top level must be a JSON object" in load_error(checkpoint_copy)
    mistral = tmp_path / "mistral"
    write_hf_checkpoint("mistral", mistral)
    cfg = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps(dict(cfg, sliding_window=0)))
    assert "sliding_window must be a positive integer" in load_error(mistral)
    gpt2 = tmp_path / "gpt2"
    write_hf_checkpoint("gpt2", gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps(dict(cfg, n_head=5)))
    assert "n_embd 48 does not divide into n_head 5 heads" in load_error(gpt2)


@pytest.mark.parametrize("bad,message", [(torch.ones(64, dtype=torch.int32), "is torch.int32; weights must be floating point"),
                                         (torch.ones(64, dtype=torch.bool), "is torch.bool"),
                                         (torch.full((64,), float("nan")), "holds NaN or infinite values"),
                                         (torch.tensor([float("inf")] * 64), "holds NaN or infinite values")])
def test_non_float_or_non_finite_weights_are_named(checkpoint_copy, bad, message):
    rewrite_tensors(checkpoint_copy, lambda s: s.__setitem__("model.norm.weight", bad))
    msg = load_error(checkpoint_copy)
    assert "model.norm.weight" in msg and message in msg


def test_a_deeply_nested_config_is_a_one_line_error(checkpoint_copy):
    (checkpoint_copy / "config.json").write_text("[" * 100_000 + "]" * 100_000)  # RecursionError in Python's reader
    assert "config.json: nested too deeply to be a config" in load_error(checkpoint_copy)
