"""Structured outputs with llguidance: grammars compiled once, one matcher per constrained
sequence, and the batch's token bitmask.

    grammars = GrammarCompiler.for_tokenizer(tokenizer, vocab_size, eos_token_ids)
    grammars.check(so)                  # compile now (cached); ValueError naming the field
    future = grammars.submit(so)        # compile on the pool; the request waits for it
    matcher = future.result().deep_copy()   # each sequence advances its own copy
    bitmask = grammars.fill_bitmask(matchers)   # (R, ceil(V/32)) int32, llguidance's packing

Compiling is llguidance's LLMatcher constructor (it drops the GIL); a compiled matcher, still at
its start, is kept per grammar text in an LRU and copied for every sequence that uses it. Mask
filling and token consumption for the batch go through llguidance's LLExecutor, which spreads the
rows over its own threads, also without the GIL, so the host fills masks while the GPU runs the
step's forward.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from engine.core.sampling_params import ParamError, StructuredOutputsParams

logger = logging.getLogger("pagedserve." + __name__)

ACCEPTED, ENDED = object(), object()  # GrammarCompiler.advance's verdicts besides an error text

# Compact JSON, as OpenAI's strict mode writes it: a model that may put whitespace anywhere can
# also put it everywhere (a small or random one fills max_tokens with newlines).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_of(so: StructuredOutputsParams) -> str:
    """llguidance's grammar text for `so`; ValueError naming the field if it is malformed (that
    it compiles is checked by GrammarCompiler)."""
    import llguidance

    kind = so.kind
    try:
        if kind == "json":
            schema = json.loads(so.json) if isinstance(so.json, str) else so.json
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema must be an object")
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                                  defaults=JSON_OPTIONS)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}',
                                                                  defaults=JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(so.regex)
        if kind == "choice":
            return llguidance.grammar_from("choice", json.dumps(so.choice))
        return llguidance.grammar_from("grammar", so.grammar)  # Lark, or GBNF turned into Lark
    except ValueError as e:
        raise ValueError(f"structured_outputs.{kind} is invalid: {e}") from None
    except RecursionError:  # a schema given as JSON text nests past the parser's depth
        raise ValueError(f"structured_outputs.{kind} is invalid: it nests too deep") from None


def ll_tokenizer(tokenizer, vocab_size: int, eos_token_ids: list[int]):
    """llguidance's view of our Tokenizer (engine/model/tokenizer.py): its tokens as bytes, for
    a model whose logits are `vocab_size` wide (ids past the tokenizer's are never allowed)."""
    return make_ll_tokenizer(tokenizer.tokenizer.to_str(), vocab_size, eos_token_ids)


def make_ll_tokenizer(source, vocab_size: int, eos_token_ids: list[int]):
    """llguidance.LLTokenizer over `source` (a tokenizer.json string or a TokenizerWrapper)."""
    import llguidance

    try:
        return llguidance.LLTokenizer(source, n_vocab=vocab_size, eos_token=list(eos_token_ids))
    except TypeError:
        # NOTE: llguidance before 1.7 (the newest wheel on some platforms) takes one eos id: the
        # grammar then ends on the first, and the engine's own eos rule still stops on the others.
        return llguidance.LLTokenizer(source, n_vocab=vocab_size, eos_token=eos_token_ids[0])


class GrammarCompiler:
    """Compiles grammars (cached by text), fills bitmasks, advances matchers."""

    def __init__(self, make_ll_tokenizer, vocab_size: int, max_cached: int = 256,
                 num_threads: int = 2, on_compile=None):
        """`make_ll_tokenizer()` -> llguidance.LLTokenizer, called once, on first use (it takes
        ~0.3 s for a 50k vocabulary). `on_compile(seconds)` observes every compile (metrics)."""
        self._make_ll_tokenizer = make_ll_tokenizer
        self._ll_tokenizer = None
        self.vocab_size = vocab_size
        self.num_words = -(-vocab_size // 32)
        self.max_cached = max_cached
        self.on_compile = on_compile
        self._cache: OrderedDict[str, object] = OrderedDict()  # grammar text -> LLMatcher
        self._lock = threading.Lock()  # the cache and the tokenizer: pool threads share them
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="pagedserve-grammar")
        self._executor = None  # llguidance.LLExecutor, made on first fill
        # fill_bitmask_soon's thread: masks fill there while the core postprocesses a step.
        self._filler = ThreadPoolExecutor(1, thread_name_prefix="pagedserve-masks")
        self._bitmask = np.empty((0, self.num_words), np.int32)
        # the bitmask words holding llguidance's special tokens, with their bits: of all of
        # them and of those that are no eos (_note_special_tokens, _spell_forced_specials)
        self._special_words = (np.empty(0, np.int64), np.empty(0, np.uint32),
                               np.empty(0, np.uint32))

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int, eos_token_ids: list[int], **kw):
        return cls(lambda: ll_tokenizer(tokenizer, vocab_size, eos_token_ids), vocab_size, **kw)

    @classmethod
    def for_model(cls, tokenizer, model_config, **kw):
        """For the model's tokenizer, ending at the model's eos ids and the tokenizer's."""
        return cls.for_tokenizer(tokenizer, model_config.vocab_size,
                                 model_config.end_ids(tokenizer), **kw)

    def _tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                tokenizer = self._make_ll_tokenizer()
                self._note_special_tokens(tokenizer)
                self._ll_tokenizer = tokenizer
            return self._ll_tokenizer

    def _note_special_tokens(self, tokenizer) -> None:
        """self._special_words for the ids llguidance holds special (below the logits' width)."""
        ids = np.array([t for t in range(self.vocab_size) if tokenizer.is_special_token(t)],
                       np.int64)
        eos = list(getattr(tokenizer, "eos_tokens", None) or [tokenizer.eos_token])
        words, at = np.unique(ids // 32, return_inverse=True)
        bits = np.left_shift(np.uint32(1), (ids % 32).astype(np.uint32))
        every, other = np.zeros(len(words), np.uint32), np.zeros(len(words), np.uint32)
        np.bitwise_or.at(every, at, bits)
        no_eos = ~np.isin(ids, eos)
        np.bitwise_or.at(other, at[no_eos], bits[no_eos])
        self._special_words = (words, every, other)

    # ------------------------------------------------------------------ compiling

    def check(self, so: StructuredOutputsParams, allowed_token_ids: list[int] | None = None):
        """The compiled matcher for `so` (at its start: copy it before use); ValueError naming the
        field and llguidance's reason when it does not compile. With `allowed_token_ids` (a
        request's), a ParamError naming that field when none of them may start the output."""
        matcher = self._compiled(so)
        if allowed_token_ids is not None:
            # The row's mask is the grammar's and these ids' together: with none in common every
            # logit is -inf, the sampler's pick is arbitrary and the grammar refuses it.
            words = np.frombuffer(matcher.deep_copy().compute_bitmask(), np.uint32)
            ids = np.asarray(allowed_token_ids, np.int64)
            ids = ids[ids < 32 * len(words)]
            if not ((words[ids // 32] >> (ids % 32).astype(np.uint32)) & 1).any():
                raise ParamError("allowed_token_ids", "none of allowed_token_ids may begin an "
                                 f"output that structured_outputs.{so.kind} allows: no token "
                                 "would be left to sample")
        return matcher

    def _compiled(self, so: StructuredOutputsParams):
        import llguidance

        text = grammar_of(so)
        with self._lock:
            matcher = self._cache.get(text)
            if matcher is not None:
                self._cache.move_to_end(text)
                return matcher
        try:
            tokenizer = self._tokenizer()
        except Exception as e:  # a tokenizer llguidance cannot read: no request can be served
            raise ValueError(f"structured_outputs: llguidance cannot use this model's "
                             f"tokenizer: {e}") from e
        start = time.perf_counter()
        matcher = llguidance.LLMatcher(tokenizer, text, log_level=0)
        seconds = time.perf_counter() - start
        if self.on_compile is not None:
            self.on_compile(seconds)
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{so.kind} does not compile: "
                             f"{matcher.get_error()}")
        # A grammar that compiles may still allow no first token (a rule or $ref that only
        # refers to itself): refused here, by name, rather than failing the request in the core
        # (a 500) at its first step.
        probe = matcher.deep_copy()
        probe.compute_bitmask()
        if probe.is_error():
            raise ValueError(f"structured_outputs.{so.kind} can match no output at all (it "
                             "allows no first token)")
        # NOTE: every copy shares the lexer, which may pass llguidance's size limit building
        # the first mask and says so only at the next one (a regex a{1000000}): every copy a
        # request takes would fail.
        probe = matcher.deep_copy()
        probe.compute_bitmask()
        if probe.is_error():
            reason = probe.get_error().splitlines()[0]  # then a dump of the parser's state
            raise ValueError(f"structured_outputs.{so.kind} is too large to match: {reason}")
        with self._lock:
            self._cache[text] = matcher
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return matcher

    def submit(self, so: StructuredOutputsParams,
               allowed_token_ids: list[int] | None = None) -> Future:
        """check(so, allowed_token_ids) on the pool: a Future of the compiled matcher (or of the
        ValueError)."""
        return self._pool.submit(self.check, so, allowed_token_ids)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._filler.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ one step

    def _llexecutor(self):
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        return self._executor

    def fill_bitmask(self, matchers: list, out: np.ndarray | None = None) -> np.ndarray:
        """(R, ceil(V/32)) int32 for the R rows of a step: bit j of word w allows token 32w + j;
        a row whose matcher is None allows every token. Written into `out` when given."""
        import llguidance.numpy as llnp

        rows = len(matchers)
        if out is not None:
            if out.shape != (rows, self.num_words) or out.dtype != np.int32:
                raise ValueError(f"fill_bitmask: out must be ({rows}, {self.num_words}) int32, "
                                 f"got {out.shape} {out.dtype}")
            bitmask = out
        else:
            if len(self._bitmask) < rows:
                self._bitmask = np.empty((max(rows, 2 * len(self._bitmask)), self.num_words),
                                         np.int32)
            bitmask = self._bitmask[:rows]
        constrained = [(m, r) for r, m in enumerate(matchers) if m is not None]
        if len(constrained) < rows:  # llguidance writes the constrained rows whole
            bitmask.fill(-1)
        if constrained:
            llnp.fill_next_token_bitmask_par(self._llexecutor(), constrained, bitmask)
            for m, r in constrained:
                if m.is_error():  # e.g. the parser hit a limit: allow nothing, never everything
                    bitmask[r] = 0  # (the core then ends the sequence with "error")
            self._spell_forced_specials(constrained, bitmask)
        return bitmask

    def _spell_forced_specials(self, constrained: list, bitmask: np.ndarray) -> None:
        """Where a grammar forces the text of a special token ("<|im_end|>" in a regex, a JSON
        const), llguidance tokenizes the forced text with the special token's id and the mask
        allows that id alone, which the matcher then refuses: the id stands for a control
        token, not for text. Such a row allows instead the first token of the forced text
        spelled in ordinary tokens (if the matcher takes it; else nothing, and the row fails)."""
        words, every, other = self._special_words
        if not words.size:
            return
        rows = np.fromiter((r for _, r in constrained), np.int64, len(constrained))
        held = bitmask[np.ix_(rows, words)].view(np.uint32) & every  # (rows, words)
        # rows allowing exactly one special token (the rest is checked below)
        one = ((held != 0).sum(axis=1) == 1) & ((held & (held - np.uint32(1))) == 0).all(axis=1)
        hit_other = (held & other != 0).any(axis=1)
        for i in np.flatnonzero(one).tolist():
            m, r = constrained[i]
            # Eos where the grammar may end (every step of some: the usual case, kept cheap)
            # or has ended (advance: ENDED) is right; so is a row allowing more than one token.
            if m.is_stopped() or (not hit_other[i] and m.is_accepting()):
                continue
            row = bitmask[r].view(np.uint32)
            if np.count_nonzero(row) != 1:
                continue
            w = int(np.flatnonzero(row)[0])
            bits = int(row[w])
            if bits & (bits - 1) or m.validate_tokens([32 * w + bits.bit_length() - 1]) == 1:
                continue  # (a special token the grammar names, as Lark's <|im_end|>)
            row[w] = 0
            forced = m.deep_copy().compute_ff_bytes().decode("utf-8", "ignore")
            spelled = self._ll_tokenizer.greedy_tokenize(forced)[:1] if forced else []
            if spelled and spelled[0] < self.vocab_size and m.validate_tokens(spelled) == 1:
                row[spelled[0] // 32] |= np.uint32(1 << (spelled[0] % 32))

    def fill_bitmask_soon(self, matchers: list, out: np.ndarray | None = None) -> Future:
        """fill_bitmask on a thread of its own (llguidance's own threads do the work, without
        the GIL); the caller must not advance these matchers until the future is done."""
        return self._filler.submit(self.fill_bitmask, matchers, out)

    def consume(self, pairs: list[tuple[object, int]]) -> list[bool]:
        """Advance each (matcher, sampled token) pair; False where the token broke the grammar."""
        if len(pairs) == 1:
            return [pairs[0][0].consume_token(pairs[0][1])]
        return self._llexecutor().consume_token_par(pairs)

    def advance(self, matchers: list, tokens: list[int], skip) -> list:
        """Feed each row's matcher (None: unconstrained) its sampled token, in parallel. Per row:
        ACCEPTED, ENDED (the grammar had already ended: the token stands for eos), or the
        grammar's error text (also for a matcher that had hit a dead end: its mask allowed
        nothing, so the token is garbage). Rows in `skip` (their sampling failed) are left alone."""
        verdicts = [ACCEPTED] * len(matchers)
        rows = []
        for r, m in enumerate(matchers):
            if m is None or r in skip:
                continue
            if m.is_error():  # a dead end (no token allowed): the row's mask was empty
                verdicts[r] = _error_reason(m)
            elif m.is_stopped():
                verdicts[r] = ENDED
            else:
                rows.append(r)
        if rows:
            accepted = self.consume([(matchers[r], tokens[r]) for r in rows])
            for r, ok in zip(rows, accepted, strict=True):
                if not ok:
                    verdicts[r] = _error_reason(matchers[r])
        return verdicts


def _error_reason(matcher) -> str:
    """A failed matcher's error for the request's reply: its first line (llguidance follows it
    with a dump of the parser's state, kilobytes long; the log keeps that)."""
    text = matcher.get_error()
    logger.debug("grammar error: %s", text)
    return text.splitlines()[0] if text else text
