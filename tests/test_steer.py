import pytest
import torch

import steer
from data import load
from model import Transformer
from tokenizer import Tokenizer


@pytest.fixture
def tiny(tiny_chat_model):
    return Transformer.from_pretrained(tiny_chat_model), Tokenizer.from_pretrained(tiny_chat_model)


def answer_pairs(pos, neg, n=4):
    """Conversations that differ only in the assistant's one-token reply."""
    q = [[{"role": "user", "content": f"Question {i}?"}] for i in range(n)]
    return [(c + [{"role": "assistant", "content": pos}], c + [{"role": "assistant", "content": neg}]) for c in q]


def plant(model, tok, weights):
    """Give single-character tokens large embeddings along one shared direction u; returns u."""
    u = torch.nn.functional.normalize(torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(0)), dim=0)
    with torch.no_grad():
        for text, scale in weights.items():
            (tid,) = tok.encode(text)
            model.tok_emb.weight[tid] = scale * u
    return u


def test_vector_points_along_the_planted_difference(tiny):
    model, tok = tiny
    u = plant(model, tok, {"Q": 40.0, "J": -40.0})
    vectors = steer.extract(model, tok, answer_pairs("Q", "J"), layers=[0, 1], read="response")
    for layer in (0, 1):
        v = vectors[layer].vector
        assert torch.nn.functional.cosine_similarity(v, u, dim=0) > 0.9
        assert vectors[layer].meta["agreement"] == 1.0


def test_extraction_is_padding_aware(tiny):
    model, tok = tiny
    pairs = steer.contrastive_pairs({"positive": "Explain in great detail.", "negative": "Answer only."},
                                    ["Hi?", "How many apples does Tom have after he gets three more?", "Why?"])
    got = steer.extract(model, tok, pairs, layers=[2], batch_size=3)[2].vector
    with torch.no_grad():  # each prompt alone, no padding, last token
        last = lambda conv: model.hidden(torch.tensor([tok.chat(conv)]), read_layers={2})[1][2][0, -1]
        want = torch.stack([last(p) for p, _ in pairs]).mean(0) - torch.stack([last(n) for _, n in pairs]).mean(0)
    assert (got - want).abs().max().item() <= 1e-5


def test_a_few_outlier_pairs_cannot_set_the_sign(tiny):
    model, tok = tiny
    plant(model, tok, {"Q": 40.0, "J": -40.0, "K": -1.0, "X": 1.0})
    pairs = answer_pairs("Q", "J", n=1) + answer_pairs("K", "X", n=3)  # one huge pair against three small ones
    with pytest.raises(ValueError, match="25% of pairs"):
        steer.extract(model, tok, pairs, layers=[0], read="response")


def test_save_load_round_trip_keeps_metadata(tiny, tmp_path):
    model, tok = tiny
    vectors = steer.extract(model, tok, answer_pairs("Q", "J"), layers=[0, 2, 3], read="response")
    vectors[2].intensity = 0.3
    path = str(tmp_path / "v.safetensors")
    steer.save_vectors(path, vectors, chosen_layer=2, meta={"behavior": "test", "hidden_size": 64})
    loaded, info = steer.load_vectors(path)
    assert sorted(loaded) == [0, 2, 3] and info["chosen_layer"] == 2 and info["intensity"] == 0.3
    for l in (0, 2, 3):
        assert torch.equal(loaded[l].vector, vectors[l].vector)
        assert loaded[l].resid_norm == pytest.approx(vectors[l].resid_norm)
        assert loaded[l].meta == vectors[l].meta
    assert loaded[2].meta["read"] == "response" and loaded[2].meta["method"] == "mean_difference"
    sv = loaded[2]
    assert sv.scaled_direction().norm().item() == pytest.approx(sv.resid_norm, rel=1e-5)


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a steering vector file"):
        steer.load_vectors(str(tmp_path / "x.safetensors"))


def test_unknown_behavior_lists_the_known_ones():
    with pytest.raises(ValueError) as e:
        load.load_behavior("sarcasm")
    assert "verbosity" in str(e.value) and "data/behaviors/sarcasm.json" in str(e.value)


def test_every_shipped_behavior_is_well_formed():
    import os

    import rewards

    for f in os.listdir(load.BEHAVIOR_DIR):
        b = load.load_behavior(f[:-5])  # "name" is the registered reward: verbosity100 is verbosity at 100 tokens
        assert b["name"] in rewards.REWARDS and b["name"] != "accuracy" and b["positive"] and b["negative"] and len(b["questions"]) >= 16
        assert isinstance(b["layer"], int) and b["intensity"] > 0


def test_sweep_runs_and_choose_prefers_coherent_settings(tiny, capsys):
    model, tok = tiny
    behavior = load.load_behavior("verbosity") | {"reward": {"min_tokens": 4}}
    vectors = steer.extract(model, tok, steer.contrastive_pairs(behavior, behavior["questions"][:4]), layers=[1, 2])
    examples = [{"question": "Tom has 2 apples and gets 3 more. How many?", "answer": "#### 5"}] * 3
    baseline, rows = steer.sweep(model, tok, behavior, vectors, examples, [1, 2], [0.5, 1.0], max_new_tokens=8, temperature=1.0, seed=0)
    assert len(rows) == 4 and "| layer | intensity | behavior |" in capsys.readouterr().out
    base = {"ppl": 10.0, "distinct": 0.9, "stopped": 1.0, "behavior": 0.0}
    good = {"layer": 3, "intensity": 0.5, "ppl": 15.0, "distinct": 0.85, "stopped": 0.9, "behavior": 0.6}
    better_but_broken = {"layer": 3, "intensity": 1.0, "ppl": 40.0, "distinct": 0.5, "stopped": 0.9, "behavior": 0.9}
    runaway = dict(good, stopped=0.2, behavior=0.8)  # answers that never end are not coherent either
    same_but_stronger = dict(good, intensity=0.75)
    assert steer.choose(base, [good, better_but_broken, runaway, same_but_stronger]) is good
    assert steer.choose(base, [better_but_broken]) is None


def test_vectors_are_extracted_again_when_the_behaviour_changes(synthetic, capsys):
    import json

    from model import Transformer
    from tokenizer import Tokenizer

    model_path, _, tmp = synthetic
    model, tok = Transformer.from_pretrained(model_path), Tokenizer.from_pretrained(model_path)
    planted, _, path = steer.load_or_extract_all(model, tok, "synthetic", model_path)
    assert sorted(planted) == [3]  # the saved file matches the behaviour: read, not extracted
    edited = dict(load.load_behavior("synthetic"), positive="Say QQQ, loudly.")
    (tmp / "behaviors" / "synthetic.json").write_text(json.dumps(edited))
    fresh, info, _ = steer.load_or_extract_all(model, tok, "synthetic", model_path)
    assert sorted(fresh) == list(range(model.config.n_layer)) and "changed" in capsys.readouterr().out
    assert info["definition"] == steer.definition_hash(edited)
    again, _, _ = steer.load_or_extract_all(model, tok, "synthetic", model_path)
    assert all(torch.equal(again[l].vector, fresh[l].vector) for l in fresh)


@pytest.mark.parametrize("flags,message", [(["--layers", "1,99"], "--layers 1,99: the model has layers 0..3"),
                                           (["--layers", "1,x"], "--layers '1,x': expected comma-separated integers"),
                                           (["--questions", "0"], "--questions must be at least 1"),
                                           (["--temperature", "-1"], "sampling needs"),
                                           (["--temperature", "inf"], "--temperature inf: must be a finite number"),
                                           (["--intensities", "0.1,nan"], "--intensities '0.1,nan': every value must be")])
def test_sweep_cli_bad_input_gives_one_line_errors(synthetic, monkeypatch, flags, message):
    model_path, data, _ = synthetic
    monkeypatch.setattr("sys.argv", ["steer.py", "--behavior", "synthetic", "--model", model_path, "--data", data, "--sweep",
                                     "--max-new-tokens", "4", "--questions", "2", *flags])
    with pytest.raises(SystemExit) as e:
        steer.main()
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code) and "\n" not in str(e.value.code)


def test_an_unusable_device_is_a_one_line_error(tiny_chat_model):
    with pytest.raises(ValueError, match="--device 'tpu' is not usable here"):
        load.load_model_and_tokenizer(tiny_chat_model, device="tpu")


def test_a_behaviour_file_missing_fields_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(load, "BEHAVIOR_DIR", str(tmp_path))
    (tmp_path / "half.json").write_text('{"name": "half", "positive": "Be long.", "questions": []}')
    with pytest.raises(ValueError, match="half.json: needs .*; missing or mistyped: negative, layer, intensity$"):
        load.load_behavior("half")


def test_vectors_are_keyed_by_the_model_not_its_folder_name(synthetic, tmp_path, capsys):
    """Two runs' `final` folders share a name; each gets its own vectors, and a vector file copied in
    from another model is extracted again, with a word."""
    import shutil

    from model import Transformer
    from tokenizer import Tokenizer

    model_path, _, _ = synthetic
    paths = []
    for run, seed in (("vspo", 1), ("grpo", 2)):
        final = tmp_path / run / "final"
        model = Transformer.from_pretrained(model_path)
        with torch.no_grad():  # as if trained: different weights
            model.layers[-1].mlp.w_down.weight.add_(0.01 * torch.randn(model.layers[-1].mlp.w_down.weight.shape,
                                                                         generator=torch.Generator().manual_seed(seed)))
        model.save_pretrained(str(final))
        paths.append(str(final))
    tok = Tokenizer.from_pretrained(paths[0])
    a_vectors, a_info, a_file = steer.load_or_extract_all(Transformer.from_pretrained(paths[0]), tok, "synthetic", paths[0])
    b_model = Transformer.from_pretrained(paths[1])
    b_vectors, b_info, b_file = steer.load_or_extract_all(b_model, tok, "synthetic", paths[1])
    assert a_file != b_file and a_info["model_fingerprint"] != b_info["model_fingerprint"]
    assert not torch.equal(a_vectors[3].vector, b_vectors[3].vector)  # b's own direction, not a's
    assert steer.vector_path(paths[0], "synthetic") == a_file  # the same model finds its file again
    copy = tmp_path / "copy" / "final"
    shutil.copytree(paths[0], copy)
    assert steer.vector_path(str(copy), "synthetic") == a_file  # a copy of the same model shares its vectors
    shutil.copy(a_file, b_file)  # a's vectors where b's belong
    capsys.readouterr()
    again, _, _ = steer.load_or_extract_all(b_model, tok, "synthetic", paths[1])
    assert "extracted from another model" in capsys.readouterr().out
    assert torch.equal(again[3].vector, b_vectors[3].vector)


def test_the_sweep_builds_prompts_as_training_does(tiny, monkeypatch):
    """Robustness is accuracy despite a misleading hint: the sweep must show the hint, as training does."""
    model, tok = tiny
    behavior = load.load_behavior("robustness")
    examples = [{"question": "What is 2 + 3?", "answer": "#### 5", "hint": 7}]
    seen = []
    real_generate = steer.generate
    monkeypatch.setattr(steer, "generate", lambda m, prompts, **kw: seen.append(prompts) or real_generate(m, prompts, **kw))
    vectors = steer.extract(model, tok, steer.contrastive_pairs(behavior, behavior["questions"][:2]), layers=[1])
    steer.sweep(model, tok, behavior, vectors, examples, [1], [0.5], max_new_tokens=2, temperature=1.0, seed=0)
    assert seen and all(p == [load.chat_prompt(tok, examples[0], behavior)] for p in seen)
    assert "I think the answer is 7." in tok.decode(seen[0][0])


@pytest.mark.parametrize("damage,message", [
    (lambda t, m: t.__setitem__("layer.3", torch.ones(63)), "has shape (63,), not (64,)"),
    (lambda t, m: t.__setitem__("layer.3", torch.ones(64, dtype=torch.int64)), "is torch.int64, not floating point"),
    (lambda t, m: t.__setitem__("layer.3", torch.zeros(64)), "is zero"),
    (lambda t, m: t.__setitem__("layer.3", torch.full((64,), float("nan"))), "holds NaN or infinite values"),
    (lambda t, m: m["layers"]["3"].__setitem__("resid_norm", "big"), "has resid_norm 'big', not a positive number"),
    (lambda t, m: m.__setitem__("intensity", float("inf")), "has intensity inf, not a finite number"),
    (lambda t, m: m.__setitem__("chosen_layer", 7), "chosen_layer 7 is not one of its layers"),
    (lambda t, m: m.pop("hidden_size"), "metadata hidden_size is missing"),  # was "has shape (64,), not (None,)"
    (lambda t, m: m.__setitem__("hidden_size", "64"), "metadata hidden_size is '64', not a positive integer"),
    (lambda t, m: m.__setitem__("hidden_size", True), "metadata hidden_size is True, not a positive integer"),
])
def test_damaged_vector_files_are_one_line_errors(synthetic, damage, message):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    model_path, _, _ = synthetic
    path = steer.vector_path(model_path, "synthetic")
    with safe_open(path, framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["vspo"])
    damage(tensors, meta)
    save_file(tensors, path, metadata={"vspo": json.dumps(meta)})
    with pytest.raises(ValueError) as e:
        steer.load_vectors(path)
    assert message in str(e.value) and "delete the file" in str(e.value) and "\n" not in str(e.value)


def test_a_vector_for_a_layer_the_model_lacks_is_an_error(synthetic, tiny):
    model, tok = tiny
    model_path, _, _ = synthetic
    sv = steer.SteeringVector(torch.ones(64), 9, resid_norm=1.0, intensity=1.0, meta={})
    steer.save_vectors(steer.vector_path(model_path, "synthetic"), {9: sv}, 9,
                       {"hidden_size": 64, "model_fingerprint": steer.model_fingerprint(model_path)})
    with pytest.raises(ValueError, match="a vector for layer 9, but the model has layers 0..3"):
        steer.load_or_extract_all(model, tok, "synthetic", model_path)


def test_a_behaviour_with_a_non_finite_intensity_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(load, "BEHAVIOR_DIR", str(tmp_path))
    fields = '"name": "b", "positive": "p", "negative": "n", "questions": ["q"], "layer": 1'
    (tmp_path / "b.json").write_text("{" + fields + ', "intensity": NaN}')  # Python's JSON reader accepts NaN
    with pytest.raises(ValueError, match="intensity \\(not finite\\)"):
        load.load_behavior("b")


def test_model_and_tokenizer_vocabularies_are_compared(tiny_chat_model, tmp_path):
    import json
    import shutil

    from model import Transformer
    from rollout import completion_logprobs, generate
    from tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tiny_chat_model)
    for rows, name in ((tok.vocab_size - 5, "fewer"), (tok.vocab_size + 40, "padded")):
        folder = tmp_path / name
        shutil.copytree(tiny_chat_model, folder)
        model = Transformer.from_pretrained(tiny_chat_model)
        with torch.no_grad():  # resize the (tied) embedding; padding rows that would win every draw
            emb = torch.cat([model.tok_emb.weight, 10 * model.norm.weight.expand(40, -1)])[:rows]
        hf = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(dict(hf, vocab_size=rows)))
        from safetensors.torch import load_file, save_file

        state = load_file(folder / "model.safetensors")
        state["model.embed_tokens.weight"] = emb.contiguous()
        save_file(state, folder / "model.safetensors")
        if name == "fewer":
            with pytest.raises(ValueError, match=f"the model has {rows} embedding rows but the tokenizer has {tok.vocab_size} ids"):
                load.load_model_and_tokenizer(str(folder))
            continue
        model, tok = load.load_model_and_tokenizer(str(folder))
        prompts = [tok.chat([{"role": "user", "content": "Hi"}])]
        free = generate(model, prompts, n=4, max_new_tokens=6, temperature=1.0)
        assert (free.tokens[:, free.prompt_width:] >= tok.vocab_size).any()  # unrestricted, the padding rows win
        r = generate(model, prompts, n=4, max_new_tokens=6, temperature=1.0, vocab_size=tok.vocab_size)
        assert (r.tokens < tok.vocab_size).all() and r.vocab_size == tok.vocab_size
        r.completions(tok)  # every sampled id decodes
        logp, _ = completion_logprobs(model, r, list(range(4)), temperature=1.0)
        mask = r.completion_mask[:, r.prompt_width:]
        assert (logp - r.logprobs[:, r.prompt_width:])[mask].abs().max().item() <= 1e-4  # the same distribution


# -----------------------------------------------------------------------------
# behaviour files: every setting checked against its reward's declaration, before any model is loaded

BEHAVIOR = {"name": "verbosity", "positive": "p", "negative": "n", "questions": ["q"], "layer": 1, "intensity": 0.5}


def write_behavior(tmp_path, monkeypatch, **edit):
    import json

    monkeypatch.setattr(load, "BEHAVIOR_DIR", str(tmp_path))
    path = tmp_path / "b.json"
    path.write_text(json.dumps({**BEHAVIOR, **edit}))  # json.dumps writes NaN, as Python's reader accepts it
    return str(path)


@pytest.mark.parametrize("edit,message", [
    # verbosity always 0, or any answer that stops verbose
    (dict(reward={"min_tokens": float("nan")}), "reward.min_tokens must be an integer from 1 to 100000, got nan"),
    (dict(reward={"min_tokens": 1e9}), "reward.min_tokens must be an integer from 1 to 100000, got 1000000000.0"),
    (dict(reward={"min_tokens": 10**9}), "reward.min_tokens must be an integer from 1 to 100000, got 1000000000"),
    (dict(reward={"min_tokens": -1}), "reward.min_tokens must be an integer from 1 to 100000, got -1"),
    (dict(reward={"min_tokens": True}), "reward.min_tokens must be an integer from 1 to 100000, got True"),
    (dict(reward={"min_distinct": float("inf")}), "reward.min_distinct must be a number from 0.0 to 1.0, got inf"),
    # a crash hours in, at the first rollout that stops on its own
    (dict(reward={"min_tokens": "200"}), "reward.min_tokens must be an integer from 1 to 100000, got '200'"),
    # a TypeError at the first evaluation
    (dict(reward="min_tokens=200"), "reward must be an object (the settings of verbosity), got str"),
    (dict(reward=[200]), "reward must be an object (the settings of verbosity), got list"),
    (dict(reward=None), "reward must be an object (the settings of verbosity), got NoneType"),
    (dict(reward={"bogus": 1}), "reward.bogus is not a setting of verbosity (its settings: min_tokens, min_distinct)"),
    (dict(name="confidence", reward={"min_tokens": 200}),
     "reward.min_tokens is not a setting of confidence (its settings: none)"),
    (dict(name="expertise", reward={"target": "wizard"}),
     "reward.target must be one of 'beginner', 'intermediate', 'expert', got 'wizard'"),
    (dict(name="expertise", reward={"min_words": "25"}), "reward.min_words must be an integer from 1 to 10000, got '25'"),
    # passed a registry check, then failed at the first evaluation
    (dict(name="accuracy"),
     "name 'accuracy' is not a registered behaviour reward; known: verbosity, expertise, confidence, robustness"),
    (dict(name="sarcasm"), "name 'sarcasm' is not a registered behaviour reward"),
    (dict(layer=True), "missing or mistyped: layer"),
    (dict(layer=-1), "missing or mistyped: layer (negative)"),
])
def test_behaviour_settings_are_checked_against_the_rewards_declaration(tmp_path, monkeypatch, edit, message):
    path = write_behavior(tmp_path, monkeypatch, **edit)
    with pytest.raises(ValueError) as e:
        load.load_behavior("b")
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("budget", [10**12, 0, True, "384", 1.5])
def test_a_behaviours_token_budget_is_checked_and_named_as_the_files(tmp_path, monkeypatch, budget):
    """train.py reports the budget as its flag: the message must say it came from the file."""
    path = write_behavior(tmp_path, monkeypatch, max_new_tokens=budget)
    with pytest.raises(ValueError) as e:
        load.load_behavior("b")
    assert str(e.value) == f"max_new_tokens in {path} must be an integer from 1 to 1000000, got {budget!r}"


def test_declared_settings_in_range_load(tmp_path, monkeypatch):
    write_behavior(tmp_path, monkeypatch, reward={"min_tokens": 1, "min_distinct": 1}, max_new_tokens=1_000_000)
    assert load.load_behavior("b")["reward"] == {"min_tokens": 1, "min_distinct": 1}  # an int passes as a float
    write_behavior(tmp_path, monkeypatch, name="expertise", reward={"target": "expert", "min_words": 10_000})
    assert load.load_behavior("b")["reward"]["target"] == "expert"
    write_behavior(tmp_path, monkeypatch, name="robustness")  # "reward" is optional
    assert load.load_behavior("b")["name"] == "robustness"


def test_a_reward_registered_without_a_declaration_takes_no_settings(tmp_path, monkeypatch):
    import rewards

    monkeypatch.setitem(rewards.REWARDS, "plain", lambda prompt, completion, example: 1.0)
    write_behavior(tmp_path, monkeypatch, name="plain", reward={})
    assert load.load_behavior("b")["name"] == "plain"
    path = write_behavior(tmp_path, monkeypatch, name="plain", reward={"min_tokens": 5})
    with pytest.raises(ValueError) as e:
        load.load_behavior("b")
    assert str(e.value) == f"{path}: reward.min_tokens is not a setting of plain (its settings: none)"


def test_a_deeply_nested_behaviour_file_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(load, "BEHAVIOR_DIR", str(tmp_path))
    (tmp_path / "b.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="b.json: nested too deeply to be a behaviour file$"):
        load.load_behavior("b")


def test_steer_checks_the_behaviour_before_loading_a_model(tmp_path, monkeypatch):
    write_behavior(tmp_path, monkeypatch, reward={"min_tokens": "200"})
    monkeypatch.setattr("sys.argv", ["steer.py", "--behavior", "b", "--model", str(tmp_path / "no-model"), "--sweep"])
    with pytest.raises(SystemExit) as e:
        steer.main()
    assert "b.json: reward.min_tokens must be" in str(e.value.code)  # not the missing model


@pytest.mark.parametrize("file_budget,flags,want", [(None, [], 256), (7, [], 7), (7, ["--max-new-tokens", "5"], 5)])
def test_the_sweep_samples_under_the_budget_training_uses(synthetic, monkeypatch, file_budget, flags, want):
    """The flag if given, else the behaviour's max_new_tokens, else 256: train.token_budget's rule."""
    import json

    model_path, data, tmp = synthetic
    behavior = load.load_behavior("synthetic")
    if file_budget is not None:  # the vectors stay valid: the definition hash covers instructions and questions
        (tmp / "behaviors" / "synthetic.json").write_text(json.dumps(dict(behavior, max_new_tokens=file_budget)))
    seen = []
    monkeypatch.setattr(steer, "sweep", lambda *args, **kw: seen.append(args[7]) or ({}, []))
    monkeypatch.setattr("sys.argv", ["steer.py", "--behavior", "synthetic", "--model", model_path, "--data", data,
                                     "--sweep", "--questions", "2", *flags])
    steer.main()
    assert seen == [want]
    assert load.sampling_budget({"max_new_tokens": 384}) == 384 and load.sampling_budget({"max_new_tokens": 384}, 0) == 0
