"""
A tiktoken tokenizer built from a checkpoint's tokenizer.json, and chat formatting.

Byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2, Qwen2) are all the same algorithm:
split the text with a regex, map each piece's UTF-8 bytes to tokens by repeatedly
merging the adjacent pair of lowest rank. tiktoken runs that algorithm fast; all we
need from tokenizer.json is the ranks (the vocabulary, its strings mapped back to bytes
through GPT-2's byte-to-unicode table), the split regex and the special tokens.

Safety: `encode` never produces a special token. A question that contains the text
"<|im_end|>" is tokenized as ordinary text; special tokens only enter a sequence
through `chat`, which inserts their ids directly.
"""

import json
import os
import re

import tiktoken

# GPT-2's pre-tokenizer regex (ByteLevel with use_regex=True)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same after a Digits(individual_digits=True) pre-tokenizer (SmolLM2): every digit is a piece of its own,
# and since a digit ends the piece before it, whitespace followed by a digit is not left for the next word
DIGITS_THEN_GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
                            r"""|\s+(?![^\s\p{N}])|\s+""")


class TokenizerError(ValueError):
    """A tokenizer.json this module cannot reproduce exactly; the message names the file."""


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _split_pattern(pre, source):
    """The single regex tiktoken needs, from the tokenizer.json pre_tokenizer."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not all(s is None or isinstance(s, dict) for s in steps):
        raise TokenizerError(f"{source}: pre_tokenizer must be an object, and a Sequence's pretokenizers a "
                             "list of objects")
    kinds = [s.get("type") if s else None for s in steps]
    if any(s.get("add_prefix_space") for s in steps if s and s.get("type") == "ByteLevel"):
        raise TokenizerError(f"{source}: ByteLevel add_prefix_space=true is not supported")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True)):
        return DIGITS_THEN_GPT2_PATTERN
    if (kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True)
            and steps[0].get("behavior") == "Isolated"):
        pattern = steps[0].get("pattern")
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        # a String pattern splits on a literal, which tiktoken's regex cannot express
        if not isinstance(regex, str):
            raise TokenizerError(f"{source}: a Split pre-tokenizer needs a Regex pattern; "
                                 f"{pattern!r} is not supported")
        try:  # tiktoken's own regex engine is the judge: an encoding of one token compiles the regex alone
            tiktoken.Encoding("regex check", pat_str=regex, mergeable_ranks={b"\0": 0}, special_tokens={})
        except ValueError as e:
            raise TokenizerError(f"{source}: the Split pre-tokenizer's regex is not valid "
                                 f"({str(e).splitlines()[0]})") from None
        return regex  # Llama 3, Qwen2: the regex is spelled out
    raise TokenizerError(f"{source}: pre-tokenizer {kinds} is not supported (byte-level BPE only: GPT-2, "
                         "Llama 3, SmolLM2, Qwen2)")


class Tokenizer:
    def __init__(self, enc, chat_format, default_system=None):
        self.enc = enc  # the tiktoken.Encoding
        self.chat_format = chat_format  # "chatml", "llama3" or "plain"
        # ChatML templates that insert a system message when none is given
        self.default_system = default_system
        self.special = dict(enc._special_tokens)  # {text: id}
        # ASCII characters whose byte has no token (SmolLM2 lacks \x04, \x06 and four more): tiktoken
        # panics on them, the tokenizers library drops them, and so does `encode`
        missing = [chr(b) for b in range(128) if bytes([b]) not in enc._mergeable_ranks]
        self._unencodable = re.compile("[" + re.escape("".join(missing)) + "]") if missing else None

    @classmethod
    def from_pretrained(cls, path):
        tj_path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj_path):
            sentencepiece = os.path.isfile(os.path.join(path, "tokenizer.model"))
            hint = " (SentencePiece tokenizer.model is not supported yet)" if sentencepiece else ""
            raise TokenizerError(f"{tj_path}: missing{hint}")
        try:
            with open(tj_path, encoding="utf-8") as f:
                tj = json.load(f)
        except ValueError as e:  # not JSON, not UTF-8, or an integer of thousands of digits
            raise TokenizerError(f"{tj_path}: not valid JSON ({e})") from None
        except RecursionError:  # Python's JSON reader recurses once per level of nesting
            raise TokenizerError(f"{tj_path}: nested too deeply to be a tokenizer.json") from None
        if not isinstance(tj, dict) or not isinstance(tj.get("model"), dict):
            raise TokenizerError(f"{tj_path}: no \"model\" object; not a tokenizer.json written by the "
                                 "tokenizers library")
        model = tj["model"]
        if model.get("type") != "BPE" or model.get("byte_fallback") or tj.get("normalizer"):
            raise TokenizerError(f"{tj_path}: only byte-level BPE tokenizers are supported; "
                                 "SentencePiece-style ones (Llama 2, Mistral v0.1: byte fallback or a "
                                 "normalizer) are out of scope for now")
        pattern = _split_pattern(tj.get("pre_tokenizer"), tj_path)
        vocab, merges, added = model.get("vocab"), model.get("merges", []), tj.get("added_tokens", [])
        if not isinstance(vocab, dict) or not isinstance(merges, list) or not isinstance(added, list):
            raise TokenizerError(f"{tj_path}: model.vocab must be an object and model.merges, added_tokens "
                                 "lists")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
            raise TokenizerError(f"{tj_path}: model.vocab must map each token to an integer id")
        if not all(isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("id"), int)
                   for t in added):
            raise TokenizerError(f"{tj_path}: every entry of added_tokens needs a string content and an "
                                 "integer id")
        # every added token, even one marked special=false (Qwen's <tool_call>), is only ever inserted by id:
        # text from data never turns into one
        special = {t["content"]: t["id"] for t in added}
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        ordinary = {tok: i for tok, i in vocab.items() if tok not in special}
        clash = set(special.values()) & set(ordinary.values())
        if clash:
            raise TokenizerError(f"{tj_path}: added token id {min(clash)} is also the id of an ordinary "
                                 "token")
        strange = next((tok for tok in ordinary if any(c not in byte_of for c in tok)), None)
        if strange is not None:
            raise TokenizerError(f"{tj_path}: vocab entry {strange!r} is not byte-level BPE (a SentencePiece "
                                 "'\u2581' vocabulary?); only byte-level BPE tokenizers are supported")
        ranks = {bytes(byte_of[c] for c in tok): i for tok, i in ordinary.items()}
        # tiktoken merges the pair whose result has the lowest rank, so ranks can be token ids only if ids
        # grow in merge order (true for tokenizers trained by BPE, and for those exported from tiktoken)
        # and if the merges build every multi-byte entry of the vocabulary, as BPE itself would
        last, built = -1, set()
        for m in merges:
            pair = m.split(" ") if isinstance(m, str) else m  # "a b", or ["a", "b"] as newer versions write
            if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(t, str) for t in pair):
                raise TokenizerError(f"{tj_path}: merge {m!r} is not a pair of tokens (\"a b\" or "
                                     "[\"a\", \"b\"])")
            a, b = pair
            rank = vocab.get(a + b)
            if rank is None or rank <= last:
                raise TokenizerError(f"{tj_path}: merge {a!r} + {b!r} is out of id order; tiktoken cannot "
                                     "reproduce this vocabulary")
            last = rank
            built.add(a + b)
        unbuilt = next((tok for tok in ordinary if len(tok) > 1 and tok not in built), None)
        if unbuilt is not None:
            raise TokenizerError(f"{tj_path}: vocab entry {unbuilt!r} is built by no merge, so its ids "
                                 "cannot be reproduced (incomplete merges)")
        enc = tiktoken.Encoding(name=os.path.basename(os.path.abspath(path)), pat_str=pattern,
                                mergeable_ranks=ranks, special_tokens=special)
        chat_format, default_system = "plain", None
        if "<|im_start|>" in special:
            chat_format = "chatml"
            tc_path = os.path.join(path, "tokenizer_config.json")
            template = ""
            if os.path.isfile(tc_path):
                try:
                    with open(tc_path, encoding="utf-8") as f:
                        template = json.load(f).get("chat_template") or ""
                except (ValueError, AttributeError, RecursionError) as e:
                    raise TokenizerError(f"{tc_path}: not a valid tokenizer config "
                                         f"({type(e).__name__})") from None
                # a list of named templates (some checkpoints): the default one
                if not isinstance(template, str):
                    template = next((t.get("template", "") for t in template if isinstance(t, dict)
                                     and t.get("name") == "default"), "")
            # the system message the template inserts when the conversation has none (SmolLM2, Qwen2)
            found = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template)
            default_system = found.group(1) if found and "message" not in found.group(1) else None
        elif "<|start_header_id|>" in special:
            chat_format = "llama3"
        return cls(enc, chat_format, default_system)

    @property
    def vocab_size(self):
        return self.enc.n_vocab

    def encode(self, text):
        """Text -> ids. Special-token text stays text (`encode_ordinary`). A character whose byte has
        no token is dropped, as the tokenizers library drops it, the text on either side encoded apart."""
        if self._unencodable is not None and self._unencodable.search(text):
            return [i for piece in self._unencodable.split(text) for i in self.enc.encode_ordinary(piece)]
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def id_of(self, special_text):
        return self.special[special_text]

    @property
    def stop_ids(self):
        """The ids that end an assistant turn."""
        names = {"chatml": ["<|im_end|>", "<|endoftext|>"],
                 "llama3": ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"],
                 "plain": ["<|endoftext|>", "</s>"]}[self.chat_format]
        return [self.special[n] for n in names if n in self.special]

    def chat(self, messages, add_generation_prompt=True):
        """Render a conversation ([{"role", "content"}]) to ids in the checkpoint's chat format.

        Text between special tokens is encoded as one piece, exactly as `tokenizers` splits
        the rendered template at its special tokens before BPE.
        """
        ids = []
        if self.chat_format == "chatml":
            start, end = self.id_of("<|im_start|>"), self.id_of("<|im_end|>")
            if self.default_system and (not messages or messages[0]["role"] != "system"):
                messages = [{"role": "system", "content": self.default_system}] + list(messages)
            for i, m in enumerate(messages):
                separator = [] if i == 0 else self.encode("\n")
                ids += separator + [start] + self.encode(f"{m['role']}\n{m['content']}") + [end]
            if messages:
                ids += self.encode("\n")
            if add_generation_prompt:
                ids += [start] + self.encode("assistant\n")
        elif self.chat_format == "llama3":
            start, end = self.id_of("<|start_header_id|>"), self.id_of("<|end_header_id|>")
            eot = self.id_of("<|eot_id|>")
            ids.append(self.id_of("<|begin_of_text|>"))
            for m in messages:
                header = [start] + self.encode(m["role"]) + [end]
                ids += header + self.encode("\n\n" + m["content"].strip()) + [eot]
            if add_generation_prompt:
                ids += [start] + self.encode("assistant") + [end] + self.encode("\n\n")
        else:  # plain text for base models such as GPT-2
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
            ids = self.encode(text + ("Assistant:" if add_generation_prompt else ""))
        return ids
