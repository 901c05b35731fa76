"""
A hand-written decoder-only transformer that loads Hugging Face checkpoints.

Two families share one code path:
  - GPT-2: LayerNorm, learned position embeddings, GELU MLP, biases everywhere.
  - Llama and its relatives (Llama 2/3/3.2, SmolLM2, Mistral, Qwen2, Qwen3): RMSNorm,
    rotary position embeddings (RoPE), SwiGLU MLP, grouped-query attention.
    Qwen2 adds a bias to q/k/v; Qwen3 normalises each query and key head (RMSNorm over
    head_dim) before RoPE; Mistral may use a sliding attention window.

The one thing this model has that a plain transformer lacks is native
residual-stream steering (VSPO's sampling-time intervention): `Steer` adds
`coeff[b] * vector` to the residual stream at the output of one block, with one
coefficient per batch row, so a single batch can hold rollouts at different
steering intensities.

Checkpoint I/O is strict on purpose: every tensor in the files must be used,
every parameter filled, every shape right. A silently half-loaded model looks
fine and produces subtly wrong text; a loud error costs a minute.
"""

import json
import math
import time
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message is one line that names the file."""


# -----------------------------------------------------------------------------
# Config


@dataclass
class Config:
    model_type: str  # one of SUPPORTED_MODEL_TYPES
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int  # < n_head means grouped-query attention
    n_embd: int
    head_dim: int
    intermediate_size: int
    max_seq_len: int
    norm_eps: float
    tie_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on each query and key head before RoPE
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # only llama3-style scaling is implemented
    sliding_window: int | None = None  # Mistral: a query sees at most this many keys (itself included)
    hf: dict = field(default_factory=dict, repr=False)  # the config.json it came from, written back on save

    @property
    def is_gpt2(self):
        return self.model_type == "gpt2"

    @classmethod
    def from_hf(cls, hf, source="config.json"):
        """Build a Config from a parsed config.json (transformers 4.x or 5.x style). Every value the
        model uses is checked here, so that a damaged or hand-edited config is a one-line error naming
        its field rather than a crash (or NaN logits) at the first forward pass."""
        if not isinstance(hf, dict):
            raise CheckpointError(f"{source}: the top level must be a JSON object, got {type(hf).__name__}")
        mt = hf.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(f"{source}: model_type {mt!r} is not supported; supported: "
                                  f"{', '.join(SUPPORTED_MODEL_TYPES)}")

        def num(name, default=None, kind=int, within=None):
            """hf[name] (default when absent or null): a positive integer, or a positive finite number."""
            v = (within if within is not None else hf).get(name)
            if v is None:
                if default is None:
                    raise CheckpointError(f"{source}: missing field {name!r} for model_type {mt!r}")
                return default
            ok = isinstance(v, int) if kind is int else isinstance(v, (int, float)) and math.isfinite(v)
            if isinstance(v, bool) or not ok or v <= 0:
                what = "a positive integer" if kind is int else "a positive finite number"
                raise CheckpointError(f"{source}: {name} must be {what}, got {v!r}")
            return kind(v)

        if mt == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh"):
                raise CheckpointError(f"{source}: GPT-2 activation {act!r} is not supported (only gelu_new)")
            if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
                raise CheckpointError(f"{source}: GPT-2 attention variants (scale_attn_by_inverse_layer_idx, "
                                      f"reorder_and_upcast_attn) are not supported")
            n_embd, n_head = num("n_embd"), num("n_head")
            if n_embd % n_head:
                raise CheckpointError(f"{source}: n_embd {n_embd} does not divide into n_head {n_head} heads")
            return cls(
                model_type=mt, vocab_size=num("vocab_size"), n_layer=num("n_layer"), n_head=n_head,
                       n_kv_head=n_head,
                n_embd=n_embd, head_dim=n_embd // n_head, intermediate_size=num("n_inner", 4 * n_embd),
                max_seq_len=num("n_positions"), norm_eps=num("layer_norm_epsilon", 1e-5, float),
                tie_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True, hf=hf,
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        # transformers 5 folds rope_theta and rope_scaling into one `rope_parameters` dict
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise CheckpointError(f"{source}: rope_scaling must be an object, got {rope!r}")
        rope = dict(rope)
        theta = num("rope_theta", 10000.0, float, within=rope if "rope_theta" in rope else hf)
        rope.pop("rope_theta", None)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise CheckpointError(f"{source}: rope scaling {rope_type!r} is not supported (only default and "
                                  "llama3)")
        if rope_type == "llama3":
            for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                num(name, kind=float, within=rope)
            if rope["high_freq_factor"] <= rope["low_freq_factor"]:
                raise CheckpointError(f"{source}: llama3 rope_scaling needs high_freq_factor > "
                                      "low_freq_factor")
        if mt in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
            raise CheckpointError(f"{source}: {mt} with use_sliding_window is not supported")
        n_embd, n_head = num("hidden_size"), num("num_attention_heads")
        n_kv_head = num("num_key_value_heads", n_head)
        if n_head % n_kv_head:
            raise CheckpointError(f"{source}: num_attention_heads {n_head} is not a multiple of "
                                  f"num_key_value_heads {n_kv_head}")
        if "head_dim" not in hf and n_embd % n_head:
            raise CheckpointError(f"{source}: hidden_size {n_embd} does not divide into {n_head} heads, and "
                                  "no head_dim is given")
        head_dim = num("head_dim", n_embd // n_head)
        if head_dim % 2:
            raise CheckpointError(f"{source}: head_dim {head_dim} is odd; RoPE rotates pairs of dimensions")
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            model_type=mt, vocab_size=num("vocab_size"), n_layer=num("num_hidden_layers"), n_head=n_head,
            n_kv_head=n_kv_head, n_embd=n_embd, head_dim=head_dim, intermediate_size=num("intermediate_size"),
            max_seq_len=num("max_position_embeddings", 2048), norm_eps=num("rms_norm_eps", 1e-6, float),
            tie_embeddings=bool(hf.get("tie_word_embeddings", mt != "mistral")),
            # Llama's attention_bias covers q, k, v and o; Qwen2 always has q/k/v bias and no o bias
            qkv_bias=attention_bias or mt == "qwen2", o_bias=attention_bias and mt != "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=mt == "qwen3", rope_theta=theta,
            rope_scaling=rope if rope_type == "llama3" else None,
            sliding_window=num("sliding_window", 0) or None if mt == "mistral" else None, hf=hf,
        )


# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # torch's rms_norm with the gain: x * rsqrt(mean(x^2) + eps) * weight in one call, the same
        # bits as the reference Llama's code written out
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        # in lower precision, normalise in fp32 and cast back before the gain, as the reference Llama
        # does, so that bf16 runs round the same way as transformers
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def rope_frequencies(config):
    """Inverse frequencies theta_i = base^(-2i/d) of RoPE (Su et al. 2021), with Llama 3.1's scaling
    if configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x, cos, signed_sin):
    # HF's "rotate half" layout: dimension i pairs with i + d/2 (not the interleaved pairs of Meta's code),
    # which is how HF checkpoints store q/k weights, so no permutation is needed on load.
    # HF writes x * cos + cat(-x2, x1) * sin; rolling x by d/2 gives cat(x2, x1), and the minus sign sits
    # in the first half of signed_sin (see Transformer._rope): the same bits in four calls instead of six
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # q, k and v in one matmul, as GPT-2's c_attn (the loader concatenates Llama's q_proj, k_proj,
        # v_proj): at decoding's few rows, one call reads the same weights as three for less overhead
        self.wqkv = Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim,
                           bias=config.qkv_bias)
        self.wo = Linear(config.n_head * config.head_dim, config.n_embd, bias=config.o_bias)
        # Qwen3: one gain of head_dim shared by every query head, another by every key head
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x, rope, mask, kv_cache):
        B, T, _ = x.shape
        H, Hkv = self.n_head, self.n_kv_head
        # (B, T, H + 2 Hkv, D): q, k, v heads side by side
        qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, self.head_dim)
        qk, v = qkv[:, :, :H + Hkv], qkv[:, :, H + Hkv:]
        if self.qk_norm:  # Qwen3 normalises each head before rotating it
            qk = torch.cat([self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])], dim=2)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q and k heads rotated in one go; cos, sin: (B, T, 1, D)
        q, k = qk.split([H, Hkv], dim=2)
        # (B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, S, D), S = cached + T
        # keys and values stay unrepeated (Hkv heads); SDPA shares each across its group of query heads.
        # No mask means plain causal attention over T == S positions, or a single query (see _attention_mask)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gpt2 = config.is_gpt2
        C, H, bias = config.n_embd, config.intermediate_size, config.mlp_bias
        if self.gpt2:
            self.w_fc = Linear(C, H, bias=bias)
        else:  # SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x)), gate and up in one matmul
            self.w_gate_up = Linear(C, 2 * H, bias=bias)
        self.w_down = Linear(H, C, bias=bias)

    def forward(self, x):
        if self.gpt2:
            return self.w_down(F.gelu(self.w_fc(x), approximate="tanh"))
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        if config.is_gpt2:
            norm = lambda: nn.LayerNorm(config.n_embd, eps=config.norm_eps)  # noqa: E731
        else:
            norm = lambda: RMSNorm(config.n_embd, config.norm_eps)  # noqa: E731
        self.attn_norm, self.mlp_norm = norm(), norm()
        self.attn = Attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, kv_cache):
        x = x + self.attn(self.attn_norm(x), rope, mask, kv_cache)
        return x + self.mlp(self.mlp_norm(x))


# -----------------------------------------------------------------------------
# Steering and the KV cache: the two hooks the sampler (rollout.py) needs


@dataclass
class Steer:
    """Add coeff[b] * vector to the residual stream at the output of block `layer`.

    `layer` is 0-based: steering at layer l is TransformerLens's `blocks.l.hook_resid_post`,
    i.e. transformers' `hidden_states[l + 1]`. `mask` (B, T) selects the positions of this
    forward call that are steered (all of them when None): with a KV cache, a prefill with
    mask 0 and decode steps with mask 1 steer only the generated tokens.
    """
    vector: torch.Tensor  # (C,)
    layer: int
    coeff: torch.Tensor  # (B,) one steering intensity per batch row
    mask: torch.Tensor | None = None  # (B, T)

    def delta(self, x):
        scale = self.coeff.to(x.dtype).view(-1, 1, 1)  # (B, 1, 1)
        if self.mask is not None:
            scale = scale * self.mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        return scale * self.vector.to(x.dtype)  # (B, T, C); exactly 0 where coeff is 0


class KVCache:
    """Preallocated keys and values of every layer: (n_layer, B, Hkv, max_len, D), unrepeated for GQA.

    `pos` is the number of filled slots. A forward pass writes its T new keys at slots
    [pos, pos + T) of every layer, attends to slots [0, pos + T), and then advances pos.
    """

    def __init__(self, config, batch_size, max_len, device=None, dtype=torch.float32):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    @property
    def max_len(self):
        return self.k.size(3)

    def select(self, rows, max_len=None):
        """Keep, reorder or repeat batch rows (an index tensor), in a cache of max_len slots (default: as
        now): copies a prefilled prompt to its n samples with room to decode, and drops finished rows
        from the active batch. Only the filled slots are copied. The rest is zeroed, though never read
        before `update` writes it: zeroing faults the new memory in at once, where leaving it empty lets
        every decode step fault in pages one at a time (docs/speed.md)."""
        shape = (self.k.size(0), len(rows), self.k.size(2), max_len or self.max_len, self.k.size(4))
        k, v = self.k.new_zeros(shape), self.v.new_zeros(shape)
        k[:, :, :, :self.pos] = self.k[:, rows, :, :self.pos]
        v[:, :, :, :self.pos] = self.v[:, rows, :, :self.pos]
        self.k, self.v = k, v

    def update(self, layer, k, v):
        T = k.size(2)
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache is full: {self.pos} + {T} tokens > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]


# -----------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.source = None  # the folder it was loaded from; save_pretrained copies its tokenizer files
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        if config.is_gpt2:
            self.pos_emb = nn.Embedding(config.max_seq_len, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        if config.is_gpt2:
            self.norm = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        else:
            self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if not config.is_gpt2:
            self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)

    def _rope(self, positions, dtype):
        # computed in fp32 from absolute positions, so left-padded rows and cached decoding rotate correctly
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()  # (B, T, D/2)
        cos, sin = freqs.cos(), freqs.sin()
        # (B, T, 1, D): the same rotation for every head; sin with apply_rope's sign folded in
        cos, signed_sin = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)
        return cos.unsqueeze(2).to(dtype), signed_sin.unsqueeze(2).to(dtype)

    def _attention_mask(self, B, T, S, padding_mask, device):
        """Boolean (B, 1, T, S) mask, True = may attend; None when plain causal attention suffices.

        Slots are columns of the (left-padded) batch: the T queries sit at slots S-T .. S-1.
        """
        window = self.config.sliding_window
        if padding_mask is None and (window is None or window >= S) and (T == 1 or T == S):
            return None  # SDPA's is_causal (or no mask at all for one query) is exact and faster
        q_slot = torch.arange(S - T, S, device=device).view(T, 1)
        k_slot = torch.arange(S, device=device).view(1, S)
        mask = k_slot <= q_slot
        if window is not None:
            mask = mask & (q_slot - k_slot < window)
        mask = mask.view(1, 1, T, S)
        if padding_mask is not None:
            # a padded query would see no key at all and SDPA would return NaN: let every query see itself
            mask = (mask & padding_mask.view(B, 1, 1, S).bool()) | (k_slot == q_slot).view(1, 1, T, S)
        return mask

    def hidden(self, tokens, positions=None, padding_mask=None, kv_cache=None, steer=None, read_layers=()):
        """The final (normalised) hidden states (B, T, C), and the residual stream at `read_layers`.

        tokens: (B, T) int64. positions: (B, T) absolute positions, default 0..T-1 after any cached
        tokens; left-padded rows pass their own (padding positions are arbitrary). padding_mask:
        (B, S) with 1 for real tokens over all S = cached + T slots. steer: a `Steer`, applied at
        the output of block steer.layer. Returns (h, {layer: (B, T, C) residual after that block}).
        """
        B, T = tokens.shape
        past = kv_cache.pos if kv_cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + T, device=tokens.device).expand(B, T)
        if steer is not None and not 0 <= steer.layer < self.config.n_layer:  # it would match no block
            raise ValueError(f"steering layer {steer.layer} is outside the model's blocks "
                             f"0..{self.config.n_layer - 1}")
        if padding_mask is not None and padding_mask.shape != (B, past + T):
            raise ValueError(f"padding_mask must be (B, cached + T) = {(B, past + T)}, got "
                             f"{tuple(padding_mask.shape)}")
        x = self.tok_emb(tokens)  # (B, T, C)
        rope = None
        if self.config.is_gpt2:
            if int(positions.max()) >= self.config.max_seq_len:
                raise ValueError(f"sequence too long: position {int(positions.max())} >= GPT-2's "
                                 f"{self.config.max_seq_len} positions")
            x = x + self.pos_emb(positions)
        else:
            rope = self._rope(positions, x.dtype)
        mask = self._attention_mask(B, T, past + T, padding_mask, tokens.device)
        reads = {}
        for i, block in enumerate(self.layers):
            x = block(x, rope, mask, kv_cache)
            if steer is not None and steer.layer == i:
                x = x + steer.delta(x)
            if i in read_layers:
                reads[i] = x
        if kv_cache is not None:
            kv_cache.pos += T
        return self.norm(x), reads

    def forward(self, tokens, positions=None, padding_mask=None, kv_cache=None, steer=None):
        """(B, T) token ids -> (B, T, vocab) logits. See `hidden` for the arguments."""
        h, _ = self.hidden(tokens, positions, padding_mask, kv_cache, steer)
        return self.lm_head(h)

    def prepacked(self, dtype=torch.float32):
        """A speed device for CPU sampling; see `prepacked` at the end of the file. fp32: results
        unchanged; bf16: the matmuls in bf16, as autocast computes them."""
        return prepacked(self, dtype)

    def drop_packed(self):
        drop_packed(self)

    # -------------------------------------------------------------------------
    # Checkpoint I/O

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32):
        """Load a Hugging Face checkpoint folder (config.json + model.safetensors or index + shards)."""
        config_path = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: not a folder; pass a checkpoint folder with config.json and "
                                  "*.safetensors")
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{config_path}: missing; a checkpoint folder needs config.json and "
                                  "*.safetensors")
        try:
            with open(config_path, encoding="utf-8") as f:
                hf = json.load(f)
        except ValueError as e:  # not JSON, not UTF-8, or an integer of thousands of digits
            raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
        except RecursionError:  # Python's JSON reader recurses once per level of nesting
            raise CheckpointError(f"{config_path}: nested too deeply to be a config") from None
        config = Config.from_hf(hf, config_path)
        found = _read_safetensors(path)
        layers = {int(m.group(1)) for key in found
                  if (m := re.match(r"(?:model\.layers|transformer\.h|h)\.(\d+)\.", key))}
        if config.n_layer > len(layers):  # before building the model, which a huge count would make slow
            raise CheckpointError(f"{config_path}: {config.n_layer} layers, but the weights in {path} hold "
                                  f"{len(layers)}")
        with torch.device("meta"):  # no memory is spent on random weights that are overwritten at once
            model = cls(config)
        state = _check_and_convert(model, found, path)
        state = {k: v.to(device=device, dtype=dtype).contiguous() for k, v in state.items()}
        if config.tie_embeddings:
            state["lm_head.weight"] = state["tok_emb.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.tok_emb.weight  # one Parameter, so it gets one gradient
        if not config.is_gpt2:
            model.inv_freq = rope_frequencies(config).to(device)
        model.source = path
        return model.eval()

    def save_pretrained(self, out_dir, state=None):
        """Write config.json + model.safetensors in the HF layout (and copy the tokenizer files along).
        `state`: the weights to write, when they are not this module's own (a sharded model's gathered
        ones)."""
        os.makedirs(out_dir, exist_ok=True)
        state = self.state_dict() if state is None else state
        state = {k: v.detach().contiguous().cpu() for k, v in to_hf_state(self.config, state).items()}
        hf = dict(self.config.hf)
        hf["dtype" if "dtype" in hf
           else "torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
        tmp = os.path.join(out_dir, "model.safetensors.tmp")
        save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(out_dir, "model.safetensors"))  # never leave a half-written checkpoint
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        if self.source and os.path.abspath(self.source) != os.path.abspath(out_dir):
            for name in TOKENIZER_FILES:
                src = os.path.join(self.source, name)
                if os.path.isfile(src):
                    with open(src, "rb") as fi, open(os.path.join(out_dir, name), "wb") as fo:
                        fo.write(fi.read())


# -----------------------------------------------------------------------------
# HF <-> internal names. One pair of functions; the strict checks are derived from them.


def _name_pairs(config):
    """(our name, HF names, transposed?) for every tensor. Where HF keeps several tensors that we fuse
    (Llama's q/k/v projections, its gate/up projections), ours is their concatenation along the
    output dimension, in the order listed."""
    pairs = []
    for i in range(config.n_layer):
        q = f"layers.{i}."
        if config.is_gpt2:
            p = f"transformer.h.{i}."
            for w in ("weight", "bias"):
                pairs += [(f"{q}attn_norm.{w}", (f"{p}ln_1.{w}",), False),
                          (f"{q}mlp_norm.{w}", (f"{p}ln_2.{w}",), False)]
            for ours, theirs in (("attn.wqkv", "attn.c_attn"), ("attn.wo", "attn.c_proj"),
                                 ("mlp.w_fc", "mlp.c_fc"), ("mlp.w_down", "mlp.c_proj")):
                # GPT-2's Conv1D computes x @ W + b with W stored (in, out): the transpose of nn.Linear
                pairs += [(f"{q}{ours}.weight", (f"{p}{theirs}.weight",), True),
                          (f"{q}{ours}.bias", (f"{p}{theirs}.bias",), False)]
            continue
        p = f"model.layers.{i}."
        pairs += [(f"{q}attn_norm.weight", (f"{p}input_layernorm.weight",), False),
                  (f"{q}mlp_norm.weight", (f"{p}post_attention_layernorm.weight",), False)]
        if config.qk_norm:
            pairs += [(f"{q}attn.{n}.weight", (f"{p}self_attn.{n}.weight",), False)
                      for n in ("q_norm", "k_norm")]
        for ours, theirs in (("attn.wqkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                             ("attn.wo", ("self_attn.o_proj",)),
                             ("mlp.w_gate_up", ("mlp.gate_proj", "mlp.up_proj")),
                             ("mlp.w_down", ("mlp.down_proj",))):
            pairs += [(f"{q}{ours}.{w}", tuple(f"{p}{t}.{w}" for t in theirs), False)
                      for w in ("weight", "bias")]
    if config.is_gpt2:
        return pairs + [("tok_emb.weight", ("transformer.wte.weight",), False),
                        ("pos_emb.weight", ("transformer.wpe.weight",), False),
                        ("norm.weight", ("transformer.ln_f.weight",), False),
                        ("norm.bias", ("transformer.ln_f.bias",), False)]
    pairs += [("tok_emb.weight", ("model.embed_tokens.weight",), False),
              ("norm.weight", ("model.norm.weight",), False)]
    if not config.tie_embeddings:
        pairs.append(("lm_head.weight", ("lm_head.weight",), False))
    return pairs


def _split_sizes(config, hf_names):
    """Rows of each HF tensor inside one of our fused ones."""
    rows = {"q_proj": config.n_head * config.head_dim, "k_proj": config.n_kv_head * config.head_dim,
            "v_proj": config.n_kv_head * config.head_dim, "gate_proj": config.intermediate_size,
            "up_proj": config.intermediate_size}
    return [rows[name.split(".")[-2]] for name in hf_names]


def to_hf_state(config, state):
    """Our state dict -> HF tensor names and layouts. Biases a config lacks are simply absent from `state`."""
    out = {}
    for ours, theirs, transposed in _name_pairs(config):
        if ours in state:
            parts = state[ours].split(_split_sizes(config, theirs)) if len(theirs) > 1 else [state[ours]]
            out.update((name, part.t() if transposed else part) for name, part in zip(theirs, parts))
    return out


def from_hf_state(config, hf_state):
    """Inverse of to_hf_state."""
    out = {}
    for ours, theirs, transposed in _name_pairs(config):
        if all(name in hf_state for name in theirs):
            x = torch.cat([hf_state[name] for name in theirs]) if len(theirs) > 1 else hf_state[theirs[0]]
            out[ours] = x.t() if transposed else x
    return out


def _is_ignorable(config, key):
    # non-persistent buffers that some exporters write anyway
    if config.is_gpt2:
        return key.endswith(".attn.bias") or key.endswith(".attn.masked_bias")
    return key.endswith(".rotary_emb.inv_freq")


def _read_safetensors(path):
    """{name: (tensor, file)} from model.safetensors or the shards named by model.safetensors.index.json."""
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid shard index ({e!r})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        folder = os.path.realpath(path)
        for name in files:  # a shard is a file of this checkpoint: never a path that leads out of its folder
            if os.path.dirname(os.path.realpath(os.path.join(folder, name))) != folder:
                raise CheckpointError(f"{index_path}: shard {name!r} is not a file inside the checkpoint "
                                      "folder")
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        weight_map, files = None, ["model.safetensors"]
    else:
        other = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".gguf"))]
        hint = ""
        if other:
            hint = f" (found {other[0]}: only safetensors are loaded, never pickles; convert it first)"
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    tensors = {}
    for name in files:
        fp = os.path.join(path, name)
        if not os.path.isfile(fp):
            raise CheckpointError(f"{fp}: shard listed in model.safetensors.index.json is missing")
        try:
            with safe_open(fp, framework="pt") as f:
                for key in f.keys():
                    if key in tensors:
                        raise CheckpointError(f"{fp}: tensor {key} also appears in {tensors[key][1]}")
                    tensors[key] = (f.get_tensor(key), name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error type for a corrupt header or truncated data
            raise CheckpointError(f"{fp}: not a readable safetensors file "
                                  f"({str(e).splitlines()[0]})") from None
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in tensors or tensors[key][1] != name:
                raise CheckpointError(f"{os.path.join(path, name)}: tensor {key} listed in the index is not "
                                      "in that shard")
    return tensors


def _check_and_convert(model, found, path):
    """Check the checkpoint's names and shapes against what this config needs; return our state dict."""
    config = model.config
    if config.is_gpt2:  # GPT2Model files have no "transformer." prefix, GPT2LMHeadModel files do
        found = {(k if k.startswith("transformer.") or k == "lm_head.weight" else "transformer." + k): v
                 for k, v in found.items()}
    expected = to_hf_state(config, model.state_dict())  # meta tensors: names and shapes only
    where = lambda key: os.path.join(path, found[key][1])
    for key, want in expected.items():
        if key not in found:
            raise CheckpointError(f"{path}: missing tensor {key} (needed by this {config.model_type} config)")
        t = found[key][0]
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(f"{where(key)}: tensor {key} has shape {tuple(t.shape)}, config.json "
                                  f"implies {tuple(want.shape)}")
        # a silent cast would turn an integer or bool tensor into nonsense weights
        if not t.is_floating_point():
            raise CheckpointError(f"{where(key)}: tensor {key} is {t.dtype}; weights must be floating point")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{where(key)}: tensor {key} holds NaN or infinite values")
    for key in found:
        if key in expected or _is_ignorable(config, key):
            continue
        if key == "lm_head.weight" and config.tie_embeddings:
            emb = "transformer.wte.weight" if config.is_gpt2 else "model.embed_tokens.weight"
            if torch.equal(found[key][0], found[emb][0]):
                continue  # a tied copy written out explicitly
            raise CheckpointError(f"{where(key)}: lm_head.weight differs from {emb} but config.json says the "
                                  "embeddings are tied")
        raise CheckpointError(f"{where(key)}: unexpected tensor {key} (not used by this {config.model_type} "
                              "config)")
    return from_hf_state(config, {k: v for k, (v, _) in found.items() if k in expected})


# -----------------------------------------------------------------------------
# Speed device: weights prepacked for oneDNN, for the sampler on the CPU. A reader can skip this
# section: `Linear` is `nn.Linear`, and `prepacked(model)` changes which kernel computes it.


class Linear(nn.Linear):
    """nn.Linear, plus a copy of the weight prepacked for oneDNN that `prepacked` switches on.
    Plain equivalent: `F.linear(x, weight, bias)`, which it computes whenever the copy is off; with a
    bf16 copy, `F.linear(x.bfloat16(), weight.bfloat16(), bias).float()`, as autocast computes it."""
    packed = None  # the prepacked copy
    packed_bias = None  # the bias in the copy's dtype
    packed_from = None  # (the weight it was made from, its and the bias's version counters then, dtype)
    use_packed = False  # set inside `prepacked`

    def forward(self, x):
        if not self.use_packed or torch.is_grad_enabled():  # the copy is detached: never differentiate it
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.packed.dtype), self.packed, self.packed_bias, "none",
                                                [], "")
        return y.to(x.dtype)  # the residual stream, norms, attention and the KV cache stay fp32

    def pack(self, dtype=torch.float32):
        """Make the packed copy, unless the one we have was made from this very weight, unchanged since,
        in this dtype: the same storage (kept alive by `packed_from`, so its address cannot be reused)
        and the same version counter, which every in-place write (an optimizer step, load_state_dict)
        increments."""
        w, b = self.weight, self.bias
        key = (w._version, None if b is None else b._version, dtype)
        made_from = self.packed_from
        if made_from is None or made_from[0].data_ptr() != w.data_ptr() or made_from[1:] != key:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().to(dtype))
            self.packed_bias = None if b is None else b.detach().to(dtype)
            self.packed_from = (w.detach(), *key)

    def __getstate__(self):
        # the packed copy is a cache of the weight (and oneDNN's tensors cannot be copied): copies of the
        # model (copy.deepcopy, as for a frozen reference policy) leave it behind and pack their own
        skip = ("packed", "packed_bias", "packed_from", "use_packed")
        return {k: v for k, v in super().__getstate__().items() if k not in skip}


def can_prepack(model, dtype=torch.float32):
    """Whether `prepacked(model, dtype)` changes anything here: fp32 weights on a CPU with oneDNN, no
    autocast around it, and for bf16 a oneDNN build that computes bf16 matmuls."""
    weight = model.lm_head.weight
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and not torch.is_autocast_enabled("cpu")
            and (dtype == torch.float32 or (dtype == torch.bfloat16
                                            and torch.ops.mkldnn._is_mkldnn_bf16_supported())))


def bf16_speedup(repeats=7):
    """How many times faster this CPU multiplies in bf16 than in fp32, measured now at a SmolLM2-sized
    weight (1536 x 576): with prepacked copies at a decode step's 32 rows, as the sampler does, and
    plainly at an update's 512 rows, as autocast does. The smaller of the two ratios, each of the best
    of `repeats` runs per side, the sides alternating so that other work on the machine slows both.
    0 where oneDNN has no bf16 matmul. train.py's --dtype auto takes bf16 above 1.5x: native bf16
    (AVX512-BF16, AMX) measures 2-3x, emulated bf16 about 0.5x (docs/speed.md)."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return 0.0
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 576, generator=gen) * 0.02
    packed = {dt: torch.ops.mkldnn._reorder_linear_weight(w.to(dt)) for dt in (torch.float32, torch.bfloat16)}
    mm = lambda x, p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
    x, y, wb = torch.randn(32, 576, generator=gen), torch.randn(512, 576, generator=gen), w.bfloat16()
    pairs = ((lambda: [mm(x, packed[torch.float32]) for _ in range(20)],
              lambda: [mm(x.bfloat16(), packed[torch.bfloat16]) for _ in range(20)]),
             (lambda: [F.linear(y, w) for _ in range(4)],
              lambda: [F.linear(y.bfloat16(), wb) for _ in range(4)]))
    ratios = []
    with torch.no_grad():
        for fp32, bf16 in pairs:
            best = [float("inf"), float("inf")]
            for k in range(repeats + 1):  # round 0 warms up (oneDNN compiles its kernels)
                for side, fn in enumerate((fp32, bf16)):
                    t0 = time.perf_counter()
                    fn()
                    if k:
                        best[side] = min(best[side], time.perf_counter() - t0)
            ratios.append(best[0] / best[1])
    return min(ratios)


@contextmanager
def prepacked(model, dtype=torch.float32):
    """Inside this block, no-grad forward passes on the CPU multiply with copies of the weights
    reordered once into oneDNN's blocked layout, in `dtype`. Plain equivalent: nothing
    (`nullcontext()`) for fp32, where every product is the same `F.linear` computed by another kernel;
    for bf16, autocast's bf16 matmuls (fp32 weights cast to bf16, the products cast back to fp32).

    Why: a plain matmul repacks its weight into such panels at every call, and with decoding's few rows
    that repacking is a large share of the call (docs/speed.md measures it; at a prefill's hundreds of
    rows it does not pay in fp32). Autocast also casts every weight to bf16 at every call, which on
    a CPU costs more than the bf16 matmul saves; the bf16 copies are cast once. The copies outlive the
    block and are remade only for weights that changed since (`Linear.pack`), so after a training step
    of the last blocks the other blocks are reused. The price is a second copy of the weights in
    memory. Elsewhere (GPU, bf16 weights or autocast, no oneDNN) it changes nothing. Writes through
    `.data` bypass the version counter and are not seen: change weights in place under
    torch.no_grad(), as optimizers do, or call `drop_packed` after."""
    if not can_prepack(model, dtype):
        yield
        return
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    try:
        for m in linears:
            m.pack(dtype)
            m.use_packed = True
        yield
    finally:
        for m in linears:
            m.use_packed = False


def drop_packed(model):
    """Forget the prepacked copies, for weights rewritten where the version counter cannot see it
    (FSDP2's all-gather into the gathered weights): the next `prepacked` block packs them afresh."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.packed = m.packed_bias = m.packed_from = None
