"""The constrained half of `bench_throughput.py --structured`: a JSON schema and, for dummy
weights (which come without a tokenizer), a synthetic vocabulary to compile it against.

The schema is an object holding an array of records (integers, strings, booleans, enums) with a
minimum item count no output reaches, so every request runs to its max_tokens as the
unconstrained ones do (ignore_eos) and the two runs generate the same tokens' worth of work: the
difference in tok/s is the cost of the masks alone. SCHEMA's strings are free (as tool-call
arguments mostly are); BOUNDED_SCHEMA gives the name a maxLength, the expensive case for mask
computation: inside a length-bounded string llguidance cannot use its precomputed token slices
and walks the whole vocabulary for every mask (measured on the CPU: ~400 us per mask for a 152k
vocabulary, ~75 us with free strings).

A dummy-weight model has no tokenizer, and llguidance needs every token's bytes to build masks.
`synthetic_grammar_compiler` makes a byte-level vocabulary of the model's size: the 256 single
bytes, JSON punctuation pairs, then distinct ASCII words of 2-10 letters (half with a leading
space, as BPE vocabularies have), seeded, with the model's eos ids as special tokens. Its mask work
resembles a real BPE vocabulary's (a large token trie of short words); the outputs are JSON in
that vocabulary.
"""

from __future__ import annotations

import random


def _schema(name: dict) -> dict:
    record = {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 1000000},
            "name": name,
            "ok": {"type": "boolean"},
            "kind": {"enum": ["alpha", "beta", "gamma", "delta"]},
        },
        "required": ["id", "name", "ok", "kind"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"rows": {"type": "array", "items": record, "minItems": 100000}},
        "required": ["rows"],
        "additionalProperties": False,
    }


SCHEMA = _schema({"type": "string"})
BOUNDED_SCHEMA = _schema({"type": "string", "maxLength": 12})

_LETTERS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
_PUNCT = [b'{"', b'":', b'",', b'"}', b'},', b'[{', b'}]', b', "', b': "', b'": ', b'", "',
          b"],", b", {", b"true", b"false", b" true", b" false"]


def synthetic_tokens(vocab_size: int, eos_token_ids: list[int], seed: int = 0) -> list[bytes]:
    """vocab_size distinct tokens; the eos ids hold placeholders (they are marked special)."""
    rng = random.Random(seed)
    tokens = [bytes([b]) for b in range(256)] + _PUNCT
    seen = set(tokens)
    num_words = vocab_size - len(eos_token_ids)
    while len(tokens) < num_words:
        word = bytes(rng.choice(_LETTERS) for _ in range(rng.choice((2, 3, 3, 4, 4, 5, 6, 8,
                                                                      10))))
        if rng.random() < 0.5:
            word = b" " + word
        if word not in seen:
            seen.add(word)
            tokens.append(word)
    for i, eos in enumerate(sorted(eos_token_ids)):
        # NOTE: the eos ids sit where the model has them; the word there moves to the end.
        tokens.insert(eos, f"<|eos{i}|>".encode())
    return tokens[:vocab_size]


class _SyntheticTokenizer:
    """What llguidance.TokenizerWrapper reads: token bytes, special ids, an encoder."""

    def __init__(self, tokens: list[bytes], eos_token_ids: list[int]):
        self.tokens = tokens
        self.eos_token_id = eos_token_ids[0]
        self.bos_token_id = None
        self.special_token_ids = list(eos_token_ids)
        self.byte_ids = [tokens.index(bytes([b])) for b in range(256)]

    def __call__(self, text: bytes) -> list[int]:
        return [self.byte_ids[b] for b in text]  # a token per byte: valid, if not the shortest


def synthetic_grammar_compiler(vocab_size: int, eos_token_ids: list[int]):
    """An engine GrammarCompiler over the synthetic vocabulary (for dummy weights)."""
    import llguidance

    from engine.structured_outputs import GrammarCompiler, make_ll_tokenizer

    def make():
        tokens = synthetic_tokens(vocab_size, eos_token_ids)
        wrapper = llguidance.TokenizerWrapper(_SyntheticTokenizer(tokens, eos_token_ids))
        return make_ll_tokenizer(wrapper, vocab_size, eos_token_ids)

    return GrammarCompiler(make, vocab_size)
