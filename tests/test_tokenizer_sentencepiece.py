"""SentencePiece GGUF tokenizers (`tokenizer.ggml.model == "llama"`: Llama 2, Mistral 7B, ...).

tests/data/sentencepiece_tiny.gguf holds a tiny SentencePiece BPE model (480 pieces, byte
fallback, two control tokens and a user-defined one), and tests/data/
tokenizer_sentencepiece_golden.json the ids and decodes SentencePiece, transformers 5 and
transformers 4 give for 143 texts; both come from tools/make_sentencepiece_golden.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import pytest
from conftest import write_tiny_gguf
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.model.tokenizer import (
    IncrementalDetokenizer,
    TokenizerError,
    gguf_tokenizer_metadata,
    tokenizer_from_gguf_metadata,
)

DATA = Path(__file__).parent / "data"
GOLDEN = json.loads((DATA / "tokenizer_sentencepiece_golden.json").read_text())
CASES = GOLDEN["texts"]
# The tokens matched whole in text: control (<|im_start|>, <|im_end|>, <s>, </s>), user-defined
WHOLE = re.compile(r"<\|im_start\|>|<\|im_end\|>|<think>|</s>|<s>")
# Text without them, '▁' or U+FFFD: it comes back from decoding as it went in
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                      blacklist_characters="<\u2581\ufffd"))


@pytest.fixture(scope="module")
def meta() -> dict:
    return gguf_tokenizer_metadata(gguf.GGUFReader(DATA / GOLDEN["gguf"]))


@pytest.fixture(scope="module")
def tok(meta):
    return tokenizer_from_gguf_metadata(meta)


def test_attributes(tok):
    assert tok.vocab_size == GOLDEN["vocab_size"] == 480
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2) == (GOLDEN["bos_token_id"],
                                                            GOLDEN["eos_token_id"])
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.all_special_ids == {0, 1, 2, 3, 4}  # <unk>, <s>, </s>, <|im_start|>, <|im_end|>
    assert tok.special_tokens == {"unk_token": "<unk>", "pad_token": "<unk>"}
    assert tok.encode("hi")[0] == 1 and tok.encode("hi", add_special_tokens=False)[0] != 1
    assert tok.id_to_token(tok.encode("hi", add_special_tokens=False)[0]).startswith("\u2581")


@pytest.mark.parametrize("case", CASES, ids=lambda c: repr(c["text"][:24]))
def test_ids_and_decode_match_sentencepiece(tok, case):
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.decode(case["ids"]) == case["decoded"]


def test_the_reference_is_sentencepiece_and_transformers():
    """`ids` is SentencePiece's encoding wherever no token is matched whole in the text; where
    one is, each stretch of text around it is encoded on its own, as llama.cpp does. Where
    transformers differs, the golden data shows why (see _sentencepiece_from_gguf)."""
    for case in CASES:
        text, ids = case["text"], case["ids"]
        if not WHOLE.search(text):
            assert ids == case["sp_ids"], text
        # transformers 4.x's conversion: the same, but it adds no user-defined token (type 4)
        if "<think>" not in text:
            assert ids == case["hf4_ids"], text
        # transformers 5.x: no '▁' after a token matched whole, nor before a leading space
        if not WHOLE.search(text) and not text.startswith((" ", "\u2581")):
            assert ids == case["hf_ids"], text
    assert sum(c["ids"] != c["hf_ids"] for c in CASES) > 0  # the data holds both kinds
    assert sum(c["ids"] != c["sp_ids"] for c in CASES) > 0


@pytest.mark.parametrize("case", CASES[:30], ids=lambda c: repr(c["text"][:24]))
def test_decode_matches_transformers(tok, case):
    assert tok.decode(case["hf_ids"]) == case["hf_decoded"]


@pytest.mark.parametrize("text", [c["text"] for c in CASES
                                  if not WHOLE.search(c["text"]) and "\u2581" not in c["text"]])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=80, deadline=None)
@given(TEXT)
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # the logprob `bytes` of the pieces join to the text with its one leading space
    assert b"".join(tok.token_bytes(i) for i in ids[1:]) == (" " + text).encode() or not text


def test_byte_fallback_pieces(tok):
    ids = tok.encode("🎉", add_special_tokens=False)
    pieces = [tok.id_to_token(i) for i in ids]
    assert pieces == ["\u2581", "<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"]
    assert [tok.token_bytes(i) for i in ids] == [b" ", b"\xf0", b"\x9f", b"\x8e", b"\x89"]
    assert tok.decode(ids) == "🎉" and tok.decode(ids[:2]) == "\ufffd"


def test_add_bos_token_and_add_space_prefix_are_respected(meta):
    no_bos = tokenizer_from_gguf_metadata({**meta, "tokenizer.ggml.add_bos_token": False})
    assert no_bos.encode("hi") == no_bos.encode("hi", add_special_tokens=False)
    with_eos = tokenizer_from_gguf_metadata({**meta, "tokenizer.ggml.add_eos_token": True})
    assert with_eos.encode("hi")[0] == 1 and with_eos.encode("hi")[-1] == 2
    bare = tokenizer_from_gguf_metadata({**meta, "tokenizer.ggml.add_space_prefix": False})
    ids = bare.encode("the end", add_special_tokens=False)
    assert not bare.id_to_token(ids[0]).startswith("\u2581")
    assert bare.decode(bare.encode(" leading")) == " leading"  # no space stripped either


def test_merges_from_the_file_are_used(meta, tok):
    """A file that lists merges: they are the BPE's (here: none, so every piece stays a
    character or a byte)."""
    plain = tokenizer_from_gguf_metadata({**meta, "tokenizer.ggml.merges": []})
    ids = plain.encode("the", add_special_tokens=False)
    assert [plain.id_to_token(i) for i in ids] == ["\u2581", "t", "h", "e"]
    assert len(tok.encode("the", add_special_tokens=False)) == 1


def test_a_control_token_spelled_in_pieces_is_never_merged_into_it():
    """SentencePiece makes only normal pieces by merging; a control token's text written as
    plain text (the chat API's client content) must not come out as the control token."""
    tokens = ["<unk>", "<s>", "</s>", "<x>", "<", "x", ">", "<x", "a"]
    types = [2, 3, 3, 3, 1, 1, 1, 1, 1]
    sp = tokenizer_from_gguf_metadata({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0, 5.0, -1.0, -2.0, -3.0, -0.5, -4.0],
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": False})
    assert sp.encode("<x>a", add_special_tokens=False) == [3, 8]
    assert sp._as_text.encode("<x>a", add_special_tokens=False).ids == [7, 6, 8]  # '<x' '>' 'a'


def test_scores_of_the_wrong_length_or_kind_are_named(meta):
    with pytest.raises(TokenizerError, match="tokenizer.ggml.scores has 2 entries for 480"):
        tokenizer_from_gguf_metadata({**meta, "tokenizer.ggml.scores": [0.0, 1.0]})
    with pytest.raises(TokenizerError, match="tokenizer.ggml.scores must be an array of numbers"):
        tokenizer_from_gguf_metadata({**meta, "tokenizer.ggml.scores": ["a"] * 480})
    no_scores = {k: v for k, v in meta.items() if k != "tokenizer.ggml.scores"}
    assert tokenizer_from_gguf_metadata(no_scores).decode(
        tokenizer_from_gguf_metadata(no_scores).encode("still works")) == "still works"


# ---------------------------------------------------------------------------------------------
# Streaming


def _stream(tok, prompt_ids, out_ids, chunks=1):
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [detok.step(out_ids[i:i + chunks]) for i in range(0, len(out_ids), chunks)]
    return deltas + [detok.flush()]


@pytest.mark.parametrize("chunks", [1, 3])
def test_deltas_add_up_to_the_decode(tok, chunks):
    """From the start of a text (BOS, skipped), the deltas are decode()'s text: the leading
    space stripped once; after a prompt, the text the output adds to the prompt's, its leading
    space kept (" Paris" after "The capital of France is", as vLLM streams it)."""
    prompt = tok.encode("Say it:")
    for case in CASES:
        ids = case["ids"]
        deltas = _stream(tok, [], ids, chunks)
        assert "".join(deltas) == tok.decode(ids), case["text"]
        assert all("\ufffd" not in d for d in deltas) or "\ufffd" in tok.decode(ids)
        out = ids[1:]
        added = tok.decode(prompt + out)[len(tok.decode(prompt)):]
        assert "".join(_stream(tok, prompt, out, chunks)) == added, case["text"]


@settings(max_examples=60, deadline=None)
@given(TEXT, st.integers(1, 4))
def test_deltas_add_up_for_any_text(tok, text, chunks):
    ids = tok.encode(text)
    assert "".join(_stream(tok, [1], ids[1:], chunks)) == tok.decode(ids) == text


def test_an_emoji_over_byte_pieces_goes_out_once(tok):
    out = tok.encode("Party 🎉 time", add_special_tokens=False)
    deltas = _stream(tok, [1], out)
    assert sum("🎉" in d for d in deltas) == 1 and all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "Party 🎉 time"


# ---------------------------------------------------------------------------------------------
# Chat template and loading


def test_chat_template_from_the_gguf(tok):
    messages = [{"role": "user", "content": "hi there"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<s><|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages)
    assert ids == tok.encode(text, add_special_tokens=False)  # the template writes BOS: once
    assert ids[:2] == [1, 3] and ids.count(1) == 1 and ids.count(3) == 2 and ids.count(4) == 1
    assert tok.decode(ids) == "user\nhi there \n assistant\n"  # '▁' after each control token


def test_special_tokens_in_chat_content_stay_text(tok):
    """The client's '<|im_end|>' is spelled with ordinary tokens inside its stretch of text,
    which is encoded whole: no '▁' before or after it, as if the token were plain text."""
    ids = tok.apply_chat_template([{"role": "user", "content": "hi<|im_end|>there"}])
    assert ids.count(4) == 1 and ids.count(3) == 2  # only the template's
    start, end = ids.index(3) + 1, ids.index(4)
    assert tok.decode(ids[start:end], skip_special_tokens=False) == "user\nhi<|im_end|>there"
    assert ids[start:end] == tok._as_text.encode("user\nhi<|im_end|>there",
                                                 add_special_tokens=False).ids
    plain = [{"role": "user", "content": "hi there"}]  # nothing of the client's matched
    assert tok.apply_chat_template(plain) == tok.apply_chat_template(
        plain, special_tokens_in_content=True)


def test_a_sentencepiece_gguf_model_loads_and_generates(tmp_path):
    from engine import LLM, SamplingParams
    from engine.executor.ops.numpy_ops import NumpyOps
    from engine.model.loader import load_model, load_tokenizer

    path = tmp_path / "sp.gguf"
    write_tiny_gguf(path, tokenizer_from=DATA / GOLDEN["gguf"])
    loaded = load_model(str(path), NumpyOps())
    # </s>, and <|im_end|> as every token spelled as an end of turn (llama.cpp's list)
    assert loaded.config.vocab_size == 480 and loaded.config.eos_token_ids == [2, 4]
    assert loaded.config.bos_token_id == 1
    for tok in (loaded.tokenizer, load_tokenizer(str(path))):
        assert tok.encode(CASES[0]["text"]) == CASES[0]["ids"]
    with LLM(str(path), device="numpy", max_model_len=64, num_kv_blocks=16) as llm:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        [out] = llm.generate(["The quick brown fox"], params, use_tqdm=False)
        tok = llm.get_tokenizer()
        prompt = list(out.prompt_token_ids)
        assert prompt == tok.encode("The quick brown fox") and prompt[0] == 1
        ids = list(out.outputs[0].token_ids)
        assert out.outputs[0].text == tok.decode(prompt + ids)[len(tok.decode(prompt)):]
        [chat] = llm.chat([{"role": "user", "content": "hi there"}], params, use_tqdm=False)
        assert list(chat.prompt_token_ids) == tok.apply_chat_template(
            [{"role": "user", "content": "hi there"}])
