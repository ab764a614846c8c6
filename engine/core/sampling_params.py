"""How to pick each next token and when to stop; shaped like vLLM's SamplingParams (floor 1)."""

from __future__ import annotations

import math
import numbers
import re
import reprlib
from dataclasses import dataclass, field

from engine.core.limits import (
    MAX_BAD_WORD_CHARS,
    MAX_BAD_WORDS,
    MAX_CACHE_SALT_CHARS,
    MAX_LOGIT_BIAS,
    MAX_LOGPROB_TOKEN_IDS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    is_int,
)


class ParamError(ValueError):
    """A request parameter out of its rules; `field` names it, so callers never parse the text."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """What the output must match: exactly one of the fields (vLLM's names).

    json: a JSON schema (dict, or its text); regex: a regular expression; choice: one of these
    strings; grammar: a Lark grammar (llguidance's dialect, or GBNF); json_object: any JSON
    object. The engine compiles it with llguidance and masks every disallowed token.
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self):
        given = [k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ParamError("structured_outputs", "structured_outputs must set exactly one of "
                             f"{', '.join(_STRUCTURED_KINDS)}; got {given or 'none'}")
        kind = given[0]
        value = getattr(self, kind)
        ok = {"json": isinstance(value, (dict, str)),
              "regex": isinstance(value, str) and bool(value),
              "choice": isinstance(value, list) and bool(value)
              and all(isinstance(c, str) and c for c in value),
              "grammar": isinstance(value, str) and bool(value),
              "json_object": value is True}[kind]
        if not ok:
            rule = {"json": "a JSON schema object or its text", "regex": "a non-empty string",
                    "choice": "a non-empty list of non-empty strings",
                    "grammar": "a non-empty string", "json_object": "true"}[kind]
            raise ParamError("structured_outputs",
                             f"structured_outputs.{kind} must be {rule}, got {reprlib.repr(value)}")

    @property
    def kind(self) -> str:
        """Which field is set: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False))


def _finite(value: int | float) -> bool:
    """math.isfinite, and False for an integer too large to be a float (it raises there)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _token_ids(ids) -> list[int] | None:
    """`ids` as a list of Python ints if it is a list or tuple of token ids (integers >= 0, not
    bools), else None. A list of Python ints, the usual case, is checked at C speed: a 4 MiB
    body holds two million ids, and this runs on the server's event loop."""
    if not isinstance(ids, (list, tuple)):
        return None
    if ids and set(map(type, ids)) == {int}:
        return list(ids) if min(ids) >= 0 else None
    return [int(t) for t in ids] if all(is_int(t) and t >= 0 for t in ids) else None


# Fields whose size a request sets: (most items, what an item is). Counted before any per-item
# work (check_count), so that the cost of refusing one is the limit's, not the body's.
COUNT_LIMITS = {"stop_token_ids": (MAX_STOP_TOKEN_IDS, "ids"),
                "logprob_token_ids": (MAX_LOGPROB_TOKEN_IDS, "ids"),
                "logit_bias": (MAX_LOGIT_BIAS, "entries"),
                "bad_words": (MAX_BAD_WORDS, "words")}


def check_count(name: str, items) -> None:
    """ParamError naming `name` when `items` (a field of COUNT_LIMITS) holds too many."""
    limit, what = COUNT_LIMITS[name]
    if isinstance(items, (list, tuple, dict)) and len(items) > limit:
        raise ParamError(name, f"{name} must hold at most {limit} {what}, got {len(items)}")


# A token id as text: ASCII digits (str.isdigit() also takes '²', which int() refuses).
_ID_TEXT = re.compile(r"-?[0-9]+")


def _logit_bias(bias) -> dict[int, float]:
    """{token id: bias} from a mapping whose keys are ids or their decimal text (JSON's)."""
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise ParamError("logit_bias", f"logit_bias must be a mapping of token ids to numbers, "
                                       f"got {reprlib.repr(bias)}")
    out = {}
    for key, value in bias.items():
        if isinstance(key, str) and _ID_TEXT.fullmatch(key.strip()):
            key = int(key)
        if not is_int(key):
            raise ParamError("logit_bias", f"logit_bias keys must be token ids, got "
                                           f"{reprlib.repr(key)}")
        key = int(key)
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not _finite(value):
            raise ParamError("logit_bias", f"logit_bias[{key}] must be a finite number, got "
                                           f"{reprlib.repr(value)}")
        out[key] = float(value)
    return out



def truncated_prompt(ids: list[int], keep: int, max_model_len: int,
                     side: str = "left") -> list[int]:
    """The prompt ids truncate_prompt_tokens `keep`s: the last (side "left") or first `keep`;
    -1: the longest prompt the model takes, which leaves room for one generated token."""
    keep = max_model_len - 1 if keep == -1 else keep
    if keep >= max_model_len:
        raise ParamError("truncate_prompt_tokens", f"truncate_prompt_tokens ({keep}) must be "
                                                   f"< max_model_len ({max_model_len})")
    return ids[-keep:] if side == "left" else ids[:keep]

# A temperature in (0, this) samples as this one (vLLM's _MAX_TEMP rule); 0 is greedy.
MIN_TEMPERATURE = 0.01
_INT_FIELDS = ("n", "top_k", "min_tokens", "max_tokens", "logprobs", "prompt_logprobs", "best_of",
               "seed", "truncate_prompt_tokens")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None  # same seed -> same tokens, whatever else is in the batch
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    # top-k logprobs per generated token; -1: the whole vocabulary
    logprobs: int | None = None
    # Logprobs of exactly these token ids (and the sampled one) per generated token, instead of
    # the top-k; `logprobs`, when given, must be their number (it defaults to it).
    logprob_token_ids: list[int] | None = None
    # Sample only among these token ids (a set: kept sorted, without repeats). Logprobs stay
    # the model's own (taken before this rule, like penalties and logit_bias).
    allowed_token_ids: list[int] | None = None
    # top-k logprobs per prompt token (scoring a text); -1: the whole vocabulary
    prompt_logprobs: int | None = None
    # vLLM's: only the prompt's last k tokens are kept (-1: the longest prompt the model takes,
    # max_model_len - 1, which leaves room for one generated token)
    truncate_prompt_tokens: int | None = None
    # vLLM's: False leaves the outputs' text empty (token ids only; stop strings need text)
    detokenize: bool = True
    skip_special_tokens: bool = True
    # vLLM's; the text is the fast tokenizer's decoding, whose added tokens are never spaced
    # apart (vLLM's fast detokenizer writes the same with True): False is refused where it
    # would matter, with skip_special_tokens False.
    spaces_between_special_tokens: bool = True
    # Beam search: best_of (default n) beams, the n best returned; a beam's score is its
    # cumulative logprob / length ** length_penalty; early_stopping ends the search once
    # best_of beams are finished.
    use_beam_search: bool = False
    best_of: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool = False

    # Words never to generate (vLLM's bad_words): each is tokenized as written and with a
    # leading space; the last token of such a token sequence is banned wherever the tokens
    # before it are the last ones generated (a one-token word: everywhere).
    bad_words: list[str] | str | None = None
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output
    # vLLM's cache_salt: the prefix cache shares blocks only between requests of the same salt
    # (a tenant's own), none between salted and unsalted ones
    cache_salt: str | None = None
    # Beam search: the top logprobs a beam's row needs, 2 x width plus the stop ids min_tokens
    # holds back (the engine core sets it: it knows the eos ids)
    beam_candidates: int = field(default=0, init=False, repr=False)
    # bad_words as token id sequences: the front (OutputProcessor, which has the tokenizer)
    # sets them, the engine core reads them
    bad_words_token_ids: list[list[int]] | None = field(default=None, init=False, repr=False)
    # structured_outputs hold only from the token after the output first ends with these ids
    # (the server sets them under --reasoning-parser: the end of a reasoning block)
    structured_outputs_after: list[int] | None = field(default=None, init=False, repr=False)
    # ... or, with this id set, from the first token unless that token is this id, which defers
    # them until after those (the server sets it under --reasoning-parser to <think> where the
    # model may open a reasoning block or answer at once: the first token may be either)
    structured_outputs_deferred_by: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise ParamError("stop", f"stop must be a string or a list of strings, got "
                                     f"{reprlib.repr(self.stop)}")
        if self.top_k == -1:
            self.top_k = 0
        for name in COUNT_LIMITS:
            check_count(name, getattr(self, name))
        ids = [] if self.stop_token_ids is None else _token_ids(self.stop_token_ids)
        if ids is None:
            raise ParamError("stop_token_ids", f"stop_token_ids must be a list of token ids, "
                                               f"got {reprlib.repr(self.stop_token_ids)}")
        self.stop_token_ids = ids
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        elif isinstance(self.bad_words, tuple):
            self.bad_words = list(self.bad_words)
        self.logit_bias = _logit_bias(self.logit_bias)
        self._normalize_token_lists()
        if isinstance(self.structured_outputs, dict):  # as msgspec or a JSON body hands it over
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self._validate()
        if 0 < self.temperature < MIN_TEMPERATURE:  # vLLM's: 1/T past 100 overflows in fp16
            self.temperature = MIN_TEMPERATURE
        if self.seed == -1:  # vLLM's (and OpenAI clients'): no seed
            self.seed = None
        for name in _INT_FIELDS:  # numpy's integers as Python's (they cross to the engine core)
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, int(value))

    def _normalize_token_lists(self):
        if isinstance(self.logprob_token_ids, (list, tuple)) and not self.logprob_token_ids:
            self.logprob_token_ids = None  # asks nothing (vLLM's reading)
        for name in ("logprob_token_ids", "allowed_token_ids"):
            ids = getattr(self, name)
            if ids is None:
                continue
            checked = _token_ids(ids)  # numpy's integers as Python's
            if not checked:
                raise ParamError(name, f"{name} must be a non-empty list of token ids, got "
                                       f"{reprlib.repr(ids)}")
            setattr(self, name, checked)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = sorted(set(self.allowed_token_ids))
        ids = self.logprob_token_ids
        if ids is not None:
            if self.logprobs is None:
                self.logprobs = len(ids)
            elif self.logprobs != len(ids):  # vLLM's rule
                raise ParamError("logprob_token_ids", f"logprobs ({self.logprobs}) must equal "
                                 f"the number of logprob_token_ids ({len(ids)}) when both are set")

    def _validate(self):
        def check(ok: bool, name: str, rule: str):
            if not ok:
                raise ParamError(name, f"{name} {rule}, got {reprlib.repr(getattr(self, name))}")

        # the integers first: the range checks below compare them
        for name in _INT_FIELDS:
            value = getattr(self, name)
            optional = name not in ("n", "top_k", "min_tokens")
            check(is_int(value) or (optional and value is None), name, "must be an integer")
        for name in ("include_stop_str_in_output", "ignore_eos", "detokenize",
                     "skip_special_tokens", "spaces_between_special_tokens", "use_beam_search",
                     "early_stopping"):
            check(isinstance(getattr(self, name), bool), name, "must be True or False")
        check(self.spaces_between_special_tokens or self.skip_special_tokens,
              "spaces_between_special_tokens", "False is not supported with "
              "skip_special_tokens False (special tokens are decoded as the tokenizer joins them)")

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "length_penalty"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and not isinstance(value, bool)
                  and _finite(value), name, "must be a finite number")
        check(self.truncate_prompt_tokens is None or self.truncate_prompt_tokens >= 1
              or self.truncate_prompt_tokens == -1, "truncate_prompt_tokens",
              "must be -1 (the longest prompt the model takes) or >= 1")
        check(1 <= self.n <= MAX_N, "n",
              f"must be an integer in [1, {MAX_N}]")
        check(self.temperature >= 0, "temperature", "must be >= 0")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        # NOTE: the sampler holds top_k as int32; a larger k keeps the whole vocabulary anyway.
        check(0 <= self.top_k < 2**31, "top_k",
              "must be -1, 0 or in [1, 2**31)")
        check(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        check(-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]")
        check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]")
        check(self.repetition_penalty > 0, "repetition_penalty", "must be > 0")
        check(
            self.max_tokens is None or self.max_tokens >= 1,
            "max_tokens",
            "must be an integer >= 1",
        )
        check(
            self.min_tokens >= 0,
            "min_tokens",
            "must be an integer >= 0",
        )
        check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"must be <= max_tokens ({self.max_tokens})",
        )
        check(
            self.logprobs is None or self.logprob_token_ids is not None
            or -1 <= self.logprobs <= MAX_LOGPROBS,
            "logprobs",
            f"must be an integer in [0, {MAX_LOGPROBS}], or -1 for the whole vocabulary",
        )
        check(
            self.prompt_logprobs is None
            or -1 <= self.prompt_logprobs <= MAX_LOGPROBS,
            "prompt_logprobs",
            f"must be an integer in [0, {MAX_LOGPROBS}], or -1 for the whole vocabulary",
        )
        check(self.best_of is None or self.best_of >= self.n,
              "best_of", f"must be an integer >= n ({self.n})")
        check(self.best_of in (None, self.n) or self.use_beam_search, "best_of",
              "other than n needs use_beam_search")
        # A beam reads its candidates from the top-k logprobs of its row.
        for name in ("logprob_token_ids", "allowed_token_ids"):
            check(getattr(self, name) is None or not self.use_beam_search, name,
                  "is not supported with use_beam_search")
        check(self.logprobs != -1 or not self.use_beam_search, "logprobs",
              "-1 (the whole vocabulary) is not supported with use_beam_search")
        # The sampler hands back at most MAX_LOGPROBS per row: 2 candidates per beam.
        check(not self.use_beam_search or 2 * self.beam_width <= MAX_LOGPROBS,
              "best_of" if self.best_of else "n",
              f"must be <= {MAX_LOGPROBS // 2} with use_beam_search")
        check(
            all(isinstance(s, str) and s for s in self.stop_list),
            "stop",
            "must be non-empty strings",
        )
        so = self.structured_outputs
        check(so is None or isinstance(so, StructuredOutputsParams), "structured_outputs",
              "must be a StructuredOutputsParams")
        # Beams branch on the top candidates of one row; each would need its own matcher fork.
        check(so is None or not self.use_beam_search, "structured_outputs",
              "is not supported with use_beam_search")
        words = self.bad_words
        check(words is None or isinstance(words, list) and all(
              isinstance(w, str) and w.strip() for w in words), "bad_words",
              "must be a string or a list of strings, none empty or only whitespace")
        check(all(len(w) <= MAX_BAD_WORD_CHARS for w in words or ()), "bad_words",
              f"must be at most {MAX_BAD_WORD_CHARS} characters each")
        # A beam's candidates are its row's top logprobs, taken before any ban.
        check(not words or not self.use_beam_search, "bad_words",
              "is not supported with use_beam_search")
        check(self.detokenize or not self.stop_list, "stop",
              "needs detokenize True (stop strings are found in the text)")
        check(len(self.stop_list) <= MAX_STOP_STRINGS, "stop",
              f"must hold at most {MAX_STOP_STRINGS} strings")
        check(all(len(s) <= MAX_STOP_STRING_CHARS for s in self.stop_list), "stop",
              f"strings must be at most {MAX_STOP_STRING_CHARS} characters each")
        salt = self.cache_salt
        check(salt is None or isinstance(salt, str) and 0 < len(salt) <= MAX_CACHE_SALT_CHARS
              and not any(c in "@/\\\0" for c in salt), "cache_salt",
              f"must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} characters "
              "without '@', '/', '\\' or NUL (vLLM's rule)")
        for token_id, value in self.logit_bias.items():
            if not -100 <= value <= 100:  # also refuses NaN
                raise ParamError("logit_bias",
                                 f"logit_bias[{token_id}] must be in [-100, 100], got {value}")

    @property
    def stop_list(self) -> list[str] | tuple[str, ...]:
        """`stop` as a sequence of strings (one string is a list of it). Read from `stop` each
        time: a stop set after construction (vLLM's get_default_sampling_params(), then its
        fields set) is the one searched for."""
        stop = self.stop
        if stop is None:
            return ()
        return [stop] if isinstance(stop, str) else stop

    @property
    def beam_width(self) -> int:
        return self.best_of or self.n

    @property
    def num_top_logprobs(self) -> int:
        """Top logprobs the sampler returns per row: logprobs, or a beam's 2 x width candidates.
        0 for a row whose logprobs are chosen ids or the whole vocabulary (computed apart)."""
        top = 0 if self.logprob_token_ids is not None or self.logprobs == -1 else self.logprobs
        if not self.use_beam_search:
            return top or 0
        return max(top or 0, 2 * self.beam_width, self.beam_candidates)


@dataclass
class BeamSearchParams:
    """LLM.beam_search's settings, as vLLM names them."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    # vLLM's field, taken so its code runs here; as in vLLM's v1 engine, it changes no beam:
    # candidates are scored by the model's own logprobs
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        limit = MAX_LOGPROBS // 2  # a beam reads 2 x width candidates from the top logprobs
        if not (is_int(self.beam_width) and 1 <= self.beam_width <= limit):
            raise ParamError("beam_width", f"beam_width must be an integer in [1, {limit}], got "
                                           f"{reprlib.repr(self.beam_width)}")
        if not (is_int(self.max_tokens) and self.max_tokens >= 1):
            raise ParamError("max_tokens", f"max_tokens must be an integer >= 1, got "
                                           f"{reprlib.repr(self.max_tokens)}")
        if not (isinstance(self.temperature, numbers.Real) and not isinstance(
                self.temperature, bool) and 0 <= self.temperature < math.inf):
            raise ParamError("temperature", f"temperature must be a number >= 0, got "
                                            f"{reprlib.repr(self.temperature)}")

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(n=self.beam_width, use_beam_search=True, temperature=0,
                              max_tokens=self.max_tokens, ignore_eos=self.ignore_eos,
                              length_penalty=self.length_penalty, logprobs=0,
                              include_stop_str_in_output=self.include_stop_str_in_output)
