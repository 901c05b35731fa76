"""
Our own KV-cached batched sampler: the rollouts of a GRPO/VSPO group, each row with its own steering
intensity.

How one call to `generate` runs:
  1. Left-pad the prompts into one (U, P) batch, where U counts the distinct prefixes: each
     prompt once, or once per distinct coefficient when steering also applies to prompt
     positions (then the prompt's keys and values depend on the coefficient).
  2. Prefill those U rows once, then copy each one's KV cache to its samples (nanochat's way).
  3. Decode one token per step for every active row, steering each row with its own
     coefficient. A row stops growing at its first stop id; when enough rows have stopped,
     they are dropped from the active batch so they cost nothing more.
The result is laid out for training: prompt left-padded to column P, completion from
column P on, so the trainer's forward pass uses the same positions and masks as sampling.
`completion_logprobs` scores those completions under a model (the trainer's policy, the
sweep's perplexity) without ever building a (rows, time, vocab) tensor.

To see it steer one prompt: python -m experiments.side_by_side --prompt "What is 12 * 7?" --behavior verbosity
"""

import contextlib
import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model import KVCache, Steer


class NonFiniteLogits(ValueError):
    """The model's logits hold NaN or inf, so no token can be drawn: its weights hold NaN or inf, or are
    finite but so large that a matmul overflows (a diverged update). `row` is the row id of the first
    such row (generate's row_ids), `position` the index of the token it was about to draw."""

    def __init__(self, row, position):
        self.row, self.position = row, position
        super().__init__(f"model produced non-finite logits at row {row}, new token {position}: its weights "
                         "hold NaN or inf, or have diverged")


@dataclass
class Rollouts:
    """N = prompts * n rows; row r is sample r % n of prompt r // n. Columns: P prompt + G generated."""
    tokens: torch.Tensor  # (N, P + G) int64: left-padded prompt, then the completion (0 after it ends)
    prompt_lens: torch.Tensor  # (N,)
    # (N, P + G) bool: generated tokens, the stop token included, nothing after it
    completion_mask: torch.Tensor
    # (N, P + G) log-prob of each generated token under the distribution it was sampled from
    logprobs: torch.Tensor
    finish_reasons: list  # "stop" or "length" per row
    coeffs: torch.Tensor  # (N,) steering coefficient each row was sampled with
    prompt_index: torch.Tensor  # (N,) which prompt each row came from
    prompt_width: int  # P: the completion starts at this column
    vocab_size: int  # ids below it could be sampled: the tokenizer's ids, not the embedding's padding rows

    @property
    def padding_mask(self):
        """(N, P + G) bool: real tokens (the prompt and the completion), False on padding."""
        cols = torch.arange(self.tokens.size(1), device=self.tokens.device)
        prompt_start = self.prompt_width - self.prompt_lens[:, None]  # (N, 1)
        return (cols >= prompt_start) & ((cols < self.prompt_width) | self.completion_mask)

    @property
    def positions(self):
        """(N, P + G) absolute positions: 0 at each row's first real prompt token."""
        cols = torch.arange(self.tokens.size(1), device=self.tokens.device)
        return (cols - (self.prompt_width - self.prompt_lens[:, None])).clamp(min=0)

    @property
    def completion_lens(self):
        return self.completion_mask.sum(1)

    def completion(self, row):
        """The generated ids of one row (the stop token included)."""
        return self.tokens[row][self.completion_mask[row]].tolist()

    def completions(self, tok):
        """(text without stop tokens, length in tokens, ended with a stop token) of every row: what the
        rewards score."""
        return [(tok.decode([t for t in self.completion(i) if t not in tok.stop_ids]), int(n), why == "stop")
                for i, (n, why) in enumerate(zip(self.completion_lens.tolist(), self.finish_reasons))]


def row_uniforms(seed, row_ids, length):
    """(N, length) float64 uniforms on [0, 1), one stream per row: row r's t-th token is drawn with
    uniforms[r, t], and its stream depends only on (seed, row_ids[r]). So a row samples the same tokens
    whichever rows share its batch, whichever rows have finished and been dropped, and on whichever
    process of a `torchrun` job it lands (train.py gives each rollout its global row id). Drawn on the
    CPU, so a GPU run draws the same numbers."""
    def row_seed(row):  # a well-mixed 63-bit seed per (seed, row), so nearby seeds give unrelated streams
        return int.from_bytes(hashlib.sha256(f"{seed}/{row}".encode()).digest()[:8], "little") >> 1

    generators = [torch.Generator().manual_seed(row_seed(int(r))) for r in row_ids]
    return torch.stack([torch.rand(length, dtype=torch.float64, generator=g) for g in generators])


def sample_token(logits, temperature, top_k, top_p, u):
    """(B, V) logits, (B,) float64 uniforms on [0, 1) -> sampled ids (B,) and their log-probs under the
    distribution actually sampled from: softmax(logits / temperature), truncated by top-k and top-p and
    renormalised. Greedy when temperature is 0 (then the log-probs are those of the untempered
    distribution, and u is unused). Overwrites `logits`."""
    if temperature == 0:
        ids = logits.argmax(-1)
        return ids, F.log_softmax(logits.float(), -1).gather(-1, ids[:, None]).squeeze(-1)
    logits = logits.float().div_(temperature)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p < 1.0:
        # nucleus (Holtzman et al. 2020): the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        logits.scatter_(-1, order, sorted_logits.masked_fill(mass_before >= top_p, float("-inf")))
    return inverse_cdf_sample(logits, u)


def left_pad(seqs, device):
    """Lists of ids -> (B, P) tokens, (B, P) positions, (B, P) bool padding mask."""
    P = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), P, dtype=torch.long)
    mask = torch.zeros(len(seqs), P, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = True
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    return tokens.to(device), positions.to(device), mask.to(device)


@torch.no_grad()
def generate(model, prompts, n=1, max_new_tokens=128, temperature=1.0, top_k=0, top_p=1.0, stop_ids=(),
             seed=0,
             vector=None, layer=None, coeffs=None, steer_prompt=True, compact_fraction=0.25, row_ids=None,
             vocab_size=None, dtype=torch.float32):
    """Sample n completions for each prompt (a list of id lists) and return `Rollouts`.

    Randomness: row r draws from its own stream, keyed by (seed, row_ids[r]) (default: r), so the same
    seed and row id give the same sample in any batch (see row_uniforms).

    Steering: `vector` (C,) is added at the output of block `layer` with coefficient coeffs[r]
    for row r (coeffs: N = len(prompts) * n values). steer_prompt=True steers the prompt
    positions too; False steers generated positions only (so the first new token, predicted from the
    last prompt position, is sampled unsteered). The same seed gives the same samples.
    compact_fraction: drop finished rows from the active batch once they are this share of it.
    vocab_size: sample only ids below it (the tokenizer's vocabulary), when the model's embedding has
    padding rows beyond it (Qwen2.5: 151,936 rows for 151,665 ids); the log-probs are then those of the
    distribution over real ids, and `completion_logprobs` scores with the same restriction.
    dtype: the matmuls' dtype on a CPU. bfloat16 multiplies with a bf16 copy of each weight, made once
    and kept while the weight is unchanged (model.prepacked), as autocast would compute them but
    without casting every weight at every step; the residual stream and the KV cache stay fp32. On a
    GPU the caller's autocast decides instead.
    """
    device = next(model.parameters()).device
    B, N = len(prompts), len(prompts) * n
    if B == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if n < 1 or max_new_tokens < 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError("sampling needs n >= 1, max_new_tokens >= 0, temperature >= 0, top_k >= 0 and 0 < "
                         f"top_p <= 1; got n={n}, max_new_tokens={max_new_tokens}, "
                         f"temperature={temperature}, top_k={top_k}, top_p={top_p}")
    P = max(len(p) for p in prompts)
    if P + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt of {P} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"{model.config.max_seq_len} positions; shorten the prompt or lower max_new_tokens")
    steering = vector is not None
    coeffs = torch.zeros(N) if coeffs is None else torch.as_tensor(coeffs, dtype=torch.float32).flatten()
    if len(coeffs) != N:
        raise ValueError(f"coeffs has {len(coeffs)} values, expected len(prompts) * n = {N}")
    if steering and layer is None:
        raise ValueError("a steering vector needs its layer")
    coeffs = coeffs.to(device)
    prompt_index = torch.arange(N, device=device) // n
    row_ids = range(N) if row_ids is None else list(row_ids)
    if len(row_ids) != N:
        raise ValueError(f"row_ids has {len(row_ids)} values, expected len(prompts) * n = {N}")
    uniforms = row_uniforms(seed, row_ids, max_new_tokens).to(device)  # (N, max_new_tokens)

    # 1-2. prefill each distinct prefix once, then copy its cache and last logits to its rows
    prefix_coeff = coeffs if (steering and steer_prompt) else torch.zeros_like(coeffs)
    keys = list(zip(prompt_index.tolist(), prefix_coeff.tolist()))
    unique = list(dict.fromkeys(keys))
    row_to_prefix = torch.tensor([unique.index(k) for k in keys], device=device)
    tokens, positions, pmask = left_pad([prompts[i] for i, _ in unique], device)
    padded = not bool(pmask.all())
    cache = KVCache(model.config, len(unique), P, device=device, dtype=next(model.parameters()).dtype)
    steer = Steer(vector, layer,
                  torch.tensor([c for _, c in unique], device=device)) if steering and steer_prompt else None
    bf16 = dtype == torch.bfloat16  # then every matmul, the prefill's too, uses the bf16 copies
    with model.prepacked(dtype) if bf16 else contextlib.nullcontext():
        h, _ = model.hidden(tokens, positions=positions, padding_mask=pmask if padded else None,
                            kv_cache=cache, steer=steer)
        # only the last position: the vocabulary projection is the costliest matmul
        logits = model.lm_head(h[:, -1])
    V = min(vocab_size or logits.size(-1), logits.size(-1))
    cache.select(row_to_prefix, P + max_new_tokens)
    logits = logits[row_to_prefix]  # (N, V)
    prompt_mask = pmask[row_to_prefix]  # (N, P)
    next_pos = positions[row_to_prefix, -1] + 1  # (N,)

    # 3. decode
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    out_tokens = torch.zeros(N, max_new_tokens, dtype=torch.long, device=device)
    out_logp = torch.zeros(N, max_new_tokens, device=device)
    lengths = torch.full((N,), max_new_tokens, dtype=torch.long, device=device)
    stopped = torch.zeros(N, dtype=torch.bool, device=device)
    active = torch.arange(N, device=device)  # the output row of each cache row
    alive = torch.ones(N, dtype=torch.bool, device=device)  # cache rows that have not stopped yet
    # Speed only: weights prepacked for few-row matmuls (model.prepacked; in fp32 not for one row, a
    # matrix-vector product it does not speed up), and inference mode, which skips autograd's
    # bookkeeping on the many small ops of each step. Tensors made in inference mode cannot be saved for
    # backward, so only this loop runs in it: it writes into output tensors made outside it.
    with torch.inference_mode(), model.prepacked(dtype) if N > 1 or bf16 else contextlib.nullcontext():
        for t in range(max_new_tokens):
            # NaN or inf anywhere in a row shows in its maximum; without this check the sampler would
            # index past the vocabulary, far from the cause
            top = logits[:, :V].amax(-1)  # (N,)
            if not bool(torch.isfinite(top).all()):
                raise NonFiniteLogits(row_ids[int(active[~torch.isfinite(top)][0])], t)
            ids, logp = sample_token(logits[:, :V], temperature, top_k, top_p, uniforms[active, t])
            rows = active[alive]
            out_tokens[rows, t], out_logp[rows, t] = ids[alive], logp[alive]
            hit = alive & torch.isin(ids, stop)
            lengths[active[hit]], stopped[active[hit]] = t + 1, True
            alive = alive & ~hit
            if t == max_new_tokens - 1 or not bool(alive.any()):
                break
            if (~alive).sum() >= max(1, compact_fraction * len(alive)):  # drop finished rows from the batch
                keep = alive.nonzero().squeeze(1)
                cache.select(keep)
                active, ids, next_pos, alive = active[keep], ids[keep], next_pos[keep], alive[keep]
            mask = None
            if padded:  # the prompt's padding, then every generated column is real for the rows still alive
                mask = torch.cat([prompt_mask[active],
                                  torch.ones(len(active), t + 1, dtype=torch.bool, device=device)], 1)
            steer = Steer(vector, layer, coeffs[active]) if steering else None
            logits = model(ids[:, None], positions=next_pos[:, None], padding_mask=mask, kv_cache=cache,
                           steer=steer)[:, -1]
            next_pos = next_pos + 1

    G = int(lengths.max())
    cols = torch.arange(G, device=device)
    completion_mask = cols[None, :] < lengths[:, None]
    return Rollouts(
        tokens=torch.cat([tokens[row_to_prefix], out_tokens[:, :G] * completion_mask], 1),
        prompt_lens=prompt_mask.sum(1),
        completion_mask=torch.cat([torch.zeros(N, P, dtype=torch.bool, device=device), completion_mask], 1),
        logprobs=torch.cat([torch.zeros(N, P, device=device), out_logp[:, :G] * completion_mask], 1),
        finish_reasons=["stop" if s else "length" for s in stopped.tolist()],
        coeffs=coeffs, prompt_index=prompt_index, prompt_width=P, vocab_size=V,
    )


# -----------------------------------------------------------------------------
# Log-probs of rollouts under a model (the trainer's policy, the sweep's coherence check),
# without the (rows, time, vocab) tensor


def _chunk_logprobs(h, weight, targets, temperature):
    logits = (h @ weight.t()).float() / temperature  # (M, V), one chunk only
    lse = torch.logsumexp(logits, -1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    with torch.no_grad():
        entropy = lse - (logits.softmax(-1) * logits).sum(-1)
    return logp, entropy


def completion_logprobs(model, r, rows, temperature, chunk=128):
    """Log-probs (n, G) and entropies (n, G) of the completion tokens of rollout rows under `model`
    (unsteered), at the sampling temperature. Only completion positions reach the vocabulary
    projection, in chunks whose logits are recomputed in backward rather than kept (activation
    checkpointing): peak memory holds one (chunk, vocab) block, not (rows, time, vocab). 128
    positions of a 49k vocabulary make 24 MiB blocks, which glibc's allocator reuses; above 32 MiB
    it maps fresh pages for every block (docs/speed.md counts the page faults)."""
    P, G = r.prompt_width, r.tokens.size(1) - r.prompt_width
    tokens, positions, padding_mask, start, end = trimmed(r, rows)
    h, _ = model.hidden(tokens, positions=positions, padding_mask=padding_mask)
    h = h[:, P - start - 1:-1]  # (n, end - P, C): the state before each completion token predicts it
    targets, mask = r.tokens[rows, P:end], r.completion_mask[rows, P:end]
    h_sel, t_sel = h[mask], targets[mask]  # (M, C), (M,)
    logp, ent = [h_sel.new_zeros(0, dtype=torch.float32)], [h_sel.new_zeros(0, dtype=torch.float32)]
    for i in range(0, len(t_sel), chunk):
        lp, e = checkpoint(_chunk_logprobs, h_sel[i:i + chunk], model.lm_head.weight[:r.vocab_size],
                           t_sel[i:i + chunk], temperature, use_reentrant=False)
        logp.append(lp)
        ent.append(e)
    full_mask = r.completion_mask[rows, P:]  # (n, G): the same tokens, in the same order, as `mask`
    zeros = torch.zeros(len(rows), G, device=h.device)
    return zeros.masked_scatter(full_mask, torch.cat(logp)), zeros.masked_scatter(full_mask, torch.cat(ent))


def trimmed(r, rows):
    """The columns of `rows` that are not padding in all of them -> (tokens, positions, padding mask
    or None, first column, end column). Speed only: the plain equivalent is every column, 0 to P + G,
    whose extra padding the attention mask hides anyway. With rows sorted by length into
    micro-batches (train.py), a micro-batch of short answers is not computed at the longest one's
    width."""
    start = r.prompt_width - int(r.prompt_lens[rows].max())
    end = r.prompt_width + int(r.completion_mask[rows].sum(1).max())
    padding_mask = r.padding_mask[rows, start:end]
    return (r.tokens[rows, start:end], r.positions[rows, start:end],
            None if bool(padding_mask.all()) else padding_mask, start, end)


# -----------------------------------------------------------------------------
# Speed device: drawing a token by a two-level inverse CDF. A reader can skip this section:
# `inverse_cdf_sample(logits, u)` is `torch.multinomial(logits.softmax(-1), 1)` with u as the randomness.

SAMPLE_BLOCK = 1024  # tokens per block of the two-level inverse CDF


def inverse_cdf_sample(logits, u):
    """(B, V) fp32 logits, (B,) uniforms on [0, 1) -> ids (B,) and their log-probs (B,).

    Plain equivalent: `torch.multinomial(logits.softmax(-1), 1)`, the same distribution, with u as each
    row's randomness: the first token whose cumulative probability exceeds u. The tests check it against
    exact probabilities. Why not multinomial: it draws one exponential per vocabulary entry, where this
    needs one uniform per row and a cumulative sum over one block of each row (docs/speed.md).

    Two levels: find the block of SAMPLE_BLOCK tokens holding u, then the token within it. Cumulative
    sums are float64, so that even the rarest token keeps its own interval; the probabilities and block
    sums stay fp32. They are left unnormalised, exp(logit - max), with u scaled to [0, total): the
    softmax's distribution without a division pass. A token of probability 0 (cut by top-k or top-p, or
    padding) has an empty interval and is never drawn. Overwrites `logits` in place, since allocating
    vocabulary-sized temporaries at every decode step costs page faults (docs/speed.md)."""
    B, V = logits.shape
    weights = logits.sub_(logits.amax(-1, keepdim=True)).exp_()  # (B, V), in place
    if V % SAMPLE_BLOCK:
        weights = F.pad(weights, (0, -V % SAMPLE_BLOCK))
    blocks = weights.reshape(B, -1, SAMPLE_BLOCK)  # (B, nb, SAMPLE_BLOCK); a view unless logits were sliced
    block_cdf = blocks.sum(-1).double().cumsum(-1)  # (B, nb)
    total = block_cdf[:, -1:]  # (B, 1)
    if not bool((torch.isfinite(total) & (total > 0)).all()):  # generate names the row before this
        raise ValueError("non-finite logits: no token can be drawn")
    u = u.view(B, 1).to(torch.float64) * total
    u = torch.minimum(u, below(total))  # u < total even after rounding
    block = torch.searchsorted(block_cdf, u, right=True)  # (B, 1): the first block whose cdf exceeds u
    # the mass of the earlier blocks, <= u
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), 0.0)
    rows = torch.arange(B, device=logits.device)
    cdf = blocks[rows, block.squeeze(-1)].cumsum(-1, dtype=torch.float64)  # (B, SAMPLE_BLOCK)
    u = torch.minimum(u - before, below(cdf[:, -1:]))  # the block's own sum may round differently
    ids = (block * SAMPLE_BLOCK + torch.searchsorted(cdf, u, right=True)).squeeze(-1)
    logp = (weights.gather(-1, ids[:, None]).double() / total).log().float()
    return ids, logp.squeeze(-1)


def below(x):
    """The largest float below x (same dtype)."""
    return torch.nextafter(x, torch.zeros_like(x))


# -----------------------------------------------------------------------------
# Flag checks shared by the command lines (train.py, steer.py, experiments/)


def parse_list(text, flag, kind=float):
    """A comma-separated flag value ("0,0.1,0.2") -> [0.0, 0.1, 0.2], or a one-line error naming the flag."""
    try:
        values = [kind(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated "
                         f"{'integers' if kind is int else 'numbers'}") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{flag} {text!r}: every value must be a finite number")
    return values


def check_finite(args):
    """Every float flag of a CLI is finite: argparse's float() accepts 'nan' and 'inf', which would reach
    the sampler or the optimizer as numbers. -> a one-line error naming the flag."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be a finite number")
