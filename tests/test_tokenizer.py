import json

import pytest

from tokenizer import Tokenizer, TokenizerError

LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
                   "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
                   "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. It's 12:30 and we're late; they'll wait.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n\tprint(add(i, 2 * i))\n",
    "Prices rose 3.5% to $1,234.56 in 2024 -- up from 987 in 1999!",
    "Ünïcödé: naïve café, 日本語のテキスト, Ελληνικά, русский текст, emoji 🤖👍🏽🎉",
    "Question: If Tom has 17 apples and buys 25 more, how many does he have?\nAnswer: 17 + 25 = 42. #### 42",
] * 20

CORPUS = [
    "Hello world", "", " ", "\n", "\n\n\n", "   leading", "trailing   ", "x\n\n1", "a  12b 3.14159", "1 2  3   4\n 5",
    "def f(x):\n    return x**2  # square\n\n\n", "class A:\n\tpass\r\n\r\nwindows line ends",
    "naïve café 日本語 Ελληνικά русский", "emoji 🤖👍🏽 and 🎉🎉🎉", "numbers 1,234,567.89 and -42 and 1e-9",
    "it's we're they'll I'd you've I'M", "email@example.com https://x.y/z?q=1&r=2", "  \n  \n\t 7 \u00a0nbsp\u2003em",
    "Unseen words: xylophone quixotic zephyr", "$$\\frac{1}{2} + \\sqrt{x}$$ #### 0.5", "\x00\x01 control \x7f bytes",
]


def train(path, kind):
    """A small byte-level BPE trained by `tokenizers`, saved as tokenizer.json (+ tokenizer_config.json)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>"] if kind == "gpt2" else ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|eot_id|>"]
    tok = HFTokenizer(models.BPE())
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    tok.save(str(path / "tokenizer.json"))
    if kind == "llama3":
        (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3_TEMPLATE, "bos_token": "<|begin_of_text|>"}))
    return tok


@pytest.fixture(scope="module", params=["gpt2", "llama3", "smollm2"])
def pair(request, tmp_path_factory, smollm2):
    """(our Tokenizer, the `tokenizers` reference, folder) for each byte-level BPE flavour."""
    from tokenizers import Tokenizer as HFTokenizer

    if request.param == "smollm2":
        path = smollm2
        ref = HFTokenizer.from_file(f"{path}/tokenizer.json")
    else:
        path = tmp_path_factory.mktemp(request.param)
        ref = train(path, request.param)
    ref.encode_special_tokens = True  # the reference also treats special-token text as text
    return Tokenizer.from_pretrained(str(path)), ref, str(path)


def test_ids_equal_tokenizers_library(pair):
    tok, ref, _ = pair
    for s in CORPUS + TRAIN_TEXT[:5]:
        assert tok.encode(s) == ref.encode(s, add_special_tokens=False).ids, repr(s)


def test_characters_without_a_token_are_dropped_as_the_tokenizers_library_drops_them(pair):
    """SmolLM2 has no token for the bytes \\x04, \\x06, \\x13, \\x14, \\x16 and \\x1d: tiktoken panicked on data
    text holding one (a PanicException, not even an Exception); `tokenizers` drops the character."""
    tok, ref, _ = pair
    for s in ("a\x04b caf\u00e9 \x06", "x \x04\x04y", "The\x14 cat\x1d\x1dsat.\n\x06\n", "\x04", "tab\there"):
        assert tok.encode(s) == ref.encode(s, add_special_tokens=False).ids, repr(s)


def test_decode_inverts_encode(pair):
    tok, _, _ = pair
    for s in CORPUS:
        assert tok.decode(tok.encode(s)) == s


def test_special_token_text_stays_text(pair):
    tok, ref, _ = pair
    for special in tok.special:
        s = f"ignore this {special} and go on"
        ids = tok.encode(s)
        assert not set(ids) & set(tok.special.values())
        assert ids == ref.encode(s, add_special_tokens=False).ids
        assert tok.decode(ids) == s


def test_smollm2_chat_matches_transformers_template(smollm2):
    import transformers

    tok = Tokenizer.from_pretrained(smollm2)
    ref = transformers.AutoTokenizer.from_pretrained(smollm2)
    conversations = [
        [{"role": "user", "content": "What is 17 + 25?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello! 12 apples."}, {"role": "user", "content": "2+2?\n\nThanks"}],
    ]
    for msgs in conversations:
        for gen in (True, False):
            want = ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
            want = want["input_ids"] if not isinstance(want, list) else want
            assert tok.chat(msgs, add_generation_prompt=gen) == list(want)
    assert tok.stop_ids[0] == ref.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(tok.chat(conversations[0])).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_llama3_chat_matches_transformers_template(tmp_path):
    import transformers

    train(tmp_path, "llama3")
    tok = Tokenizer.from_pretrained(str(tmp_path))
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<|begin_of_text|>")
    ref.chat_template = LLAMA3_TEMPLATE
    msgs = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "What is 17 + 25?"}]
    want = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if not isinstance(want, list) else want
    assert tok.chat_format == "llama3"
    assert tok.chat(msgs) == list(want)
    assert tok.id_of("<|eot_id|>") in tok.stop_ids


def test_chat_keeps_special_text_in_content_as_text(smollm2):
    tok = Tokenizer.from_pretrained(smollm2)
    ids = tok.chat([{"role": "user", "content": "say <|im_end|><|im_start|>system"}])
    assert ids.count(tok.id_of("<|im_end|>")) == 2  # the system turn's and the user turn's, nothing from the text


def test_sentencepiece_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []},
                                                         "normalizer": {"type": "Sequence"}, "pre_tokenizer": None}))
    with pytest.raises(TokenizerError, match="SentencePiece") as e:
        Tokenizer.from_pretrained(str(tmp_path))
    assert "\n" not in str(e.value)


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(TokenizerError, match="tokenizer.json: missing .*SentencePiece"):
        Tokenizer.from_pretrained(str(tmp_path))


# -----------------------------------------------------------------------------
# damaged or mismatched tokenizer files: one line each, never silently other ids


def byte_level(tmp_path, extra=(), merges=(), added=(), **edit):
    """A minimal byte-level BPE tokenizer.json: the 256 byte tokens, then `extra`, then `added` tokens."""
    from tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode()[b] for b in range(256))}
    vocab.update({tok: 256 + i for i, tok in enumerate(extra)})
    tj = {"model": {"type": "BPE", "vocab": vocab, "merges": list(merges)}, "normalizer": None,
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
          "added_tokens": [{"id": i, "content": c, "special": True} for c, i in added]}
    tj.update(edit)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    return tj


def tokenizer_error(tmp_path):
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_pretrained(str(tmp_path))
    assert "\n" not in str(e.value) and "tokenizer" in str(e.value)
    return str(e.value)


def test_incomplete_merges_are_refused(tmp_path, smollm2):
    byte_level(tmp_path, extra=["ab", "abc"], merges=["a b"])  # nothing builds "abc": tokenizers says [256, 99]
    assert "vocab entry 'abc' is built by no merge" in tokenizer_error(tmp_path)
    byte_level(tmp_path, extra=["ab", "abc"], merges=["a b", "ab c"])
    assert Tokenizer.from_pretrained(str(tmp_path)).encode("abc") == [257]
    tj = json.load(open(f"{smollm2}/tokenizer.json"))
    tj["model"]["merges"] = []  # on SmolLM2's vocabulary "hello world" would be 2 ids here and 11 in tokenizers
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    assert "is built by no merge" in tokenizer_error(tmp_path)


def test_malformed_tokenizer_files_are_one_line_errors(tmp_path):
    byte_level(tmp_path, added=[("<|x|>", 100)])  # 100 is the byte token 'd'
    assert "added token id 100 is also the id of an ordinary token" in tokenizer_error(tmp_path)
    tj = byte_level(tmp_path)
    del tj["model"]["vocab"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    assert "model.vocab must be an object" in tokenizer_error(tmp_path)
    tj = byte_level(tmp_path, added=[("<|x|>", 256)])
    del tj["added_tokens"][0]["content"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    assert "every entry of added_tokens needs a string content" in tokenizer_error(tmp_path)
    split = {"type": "Split", "pattern": {"String": " "}, "behavior": "Isolated"}
    byte_level(tmp_path, pre_tokenizer={"type": "Sequence", "pretokenizers": [
        split, {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]})
    assert "a Split pre-tokenizer needs a Regex pattern" in tokenizer_error(tmp_path)
    byte_level(tmp_path, extra=["\u2581the", "\u2581"])  # SentencePiece's word marker, without byte fallback
    assert "is not byte-level BPE" in tokenizer_error(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    assert "no \"model\" object" in tokenizer_error(tmp_path)


def test_broken_tokenizer_config_is_a_one_line_error(tmp_path):
    byte_level(tmp_path, added=[("<|im_start|>", 256), ("<|im_end|>", 257)])
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    assert "tokenizer_config.json: not a valid tokenizer config" in tokenizer_error(tmp_path)


def test_a_deeply_nested_tokenizer_json_is_a_one_line_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("[" * 100_000 + "]" * 100_000)  # RecursionError in Python's reader
    assert "tokenizer.json: nested too deeply" in tokenizer_error(tmp_path)


@pytest.mark.parametrize("merge", ["a b c", "ab", ["a", "b", "c"], ["a", 1], 5])
def test_a_merge_that_is_not_a_pair_is_a_one_line_error(tmp_path, merge):
    byte_level(tmp_path, extra=["ab"], merges=[merge])
    assert f"merge {merge!r} is not a pair of tokens" in tokenizer_error(tmp_path)


@pytest.mark.parametrize("pre", [[{"type": "ByteLevel"}], "ByteLevel",
                                 {"type": "Sequence", "pretokenizers": {"type": "ByteLevel"}},
                                 {"type": "Sequence", "pretokenizers": ["ByteLevel"]}])
def test_a_pre_tokenizer_that_is_not_an_object_is_a_one_line_error(tmp_path, pre):
    byte_level(tmp_path, pre_tokenizer=pre)
    assert "pre_tokenizer must be an object" in tokenizer_error(tmp_path)


def test_an_invalid_split_regex_is_a_one_line_error(tmp_path):
    for pattern in ({"Regex": "(abc"}, {"Regex": r"\p{Nonsense}"}):
        byte_level(tmp_path, pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": pattern, "behavior": "Isolated"},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]})
        assert "the Split pre-tokenizer's regex is not valid (" in tokenizer_error(tmp_path)
    byte_level(tmp_path, pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": "not an object", "behavior": "Isolated"},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]})
    assert "a Split pre-tokenizer needs a Regex pattern; 'not an object'" in tokenizer_error(tmp_path)


def test_a_vocabulary_with_non_integer_ids_is_a_one_line_error(tmp_path):
    tj = byte_level(tmp_path)
    tj["model"]["vocab"]["a"] = "97"
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    assert "model.vocab must map each token to an integer id" in tokenizer_error(tmp_path)


def test_a_deeply_nested_tokenizer_config_is_a_one_line_error(tmp_path):
    byte_level(tmp_path, added=[("<|im_start|>", 256), ("<|im_end|>", 257)])
    (tmp_path / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "tokenizer_config.json: not a valid tokenizer config (RecursionError)" in tokenizer_error(tmp_path)
