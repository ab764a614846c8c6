"""What crosses between the engine's halves, and what users get back.

The engine core (engine/engine_core.py) works on token ids: it takes EngineCoreRequests and hands
back, per step, one SeqOutput per sequence that sampled. The output processor
(engine/output_processor.py) turns those into RequestOutputs: one per request that changed, each
CompletionOutput carrying both the whole output so far (`text`, `token_ids`, `logprobs`) and what
this step added (`delta_*`), so a streaming server sends deltas and a batch caller reads the totals
from the last output. The core messages are plain dataclasses, so msgspec encodes them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.sampling_params import SamplingParams

# ---------------------------------------------------------------- between front and core


@dataclass
class EngineCoreRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


@dataclass
class SeqOutput:
    """One sequence's news from one step of the core."""

    request_id: str
    index: int  # which of the request's n sequences
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None  # per new token {id: logprob}: sampled + top-k
    cumulative_logprob: float
    finish_reason: str | None  # None | "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None  # the stop token id that ended it (the front adds strings)
    error: str | None = None  # why, when finish_reason == "error"
    # Set on a sequence's first output: when its request was first scheduled.
    first_scheduled_time: float | None = None
    # Set on the request's first output only: its prompt's logprobs (first entry None; when
    # params.prompt_logprobs is set), how many prompt tokens the prefix cache held and how
    # many the request wrote to it.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_logprob_ranks: list[int | None] | None = None  # each prompt token's own rank
    num_cached_tokens: int | None = None
    num_created_cache_tokens: int = 0

    # From a step that verified drafts (speculative decoding, maybe several new tokens): each
    # one's logprob, so a front that cuts them at a stop string can take the dropped ones out of
    # cumulative_logprob.
    token_logprobs: list[float] | None = None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int  # prompt tokens run through the model (prefix-cache hits excluded)
    generation_tokens_total: int
    num_steps: int
    num_chunked_prefill_steps: int
    num_mixed_steps: int
    # Speculative decoding: sequence-steps that verified drafts, drafts verified, drafts accepted.
    # Acceptance rate = accepted / draft tokens; mean accepted length (tokens per verifying
    # sequence-step, the bonus token included) = 1 + accepted / drafts.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0


@dataclass
class EngineCoreOutputs:
    """One message from the engine core to its front: a step's outputs, and what became of the
    requests and commands it took since its last message."""

    outputs: list[SeqOutput] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)  # request ids add_request took
    # (request id, the field at fault if the error named one (ParamError), why)
    rejected: list[tuple[str, str | None, str]] = field(default_factory=list)
    stats: EngineStats | None = None
    fatal: str | None = None  # the core is going down, and why
    # (ticket, EngineCore.snapshot) for each SNAPSHOT asked since: the dashboard's view
    snapshots: list[tuple[int, dict]] = field(default_factory=list)
    # Where first tokens wait (server/timeline.py), in time.monotonic() seconds: when the core
    # sent this message, and (request id, received, first scheduled, that step launched, its
    # tokens read) for each request whose first token it carries. Set by the core process.
    sent_time: float = 0.0
    first_token_times: list[tuple[str, float, float, float, float]] = field(default_factory=list)


# ---------------------------------------------------------------- to users


class ListPrefix:
    """items[start:end] of a list that only grows (a sequence's tokens, its logprobs), copied out
    the first time it is read.

    The engine builds a CompletionOutput per running request every step, but a streaming or batch
    caller reads the whole `token_ids` / `logprobs` only of the last one: copying them every step
    would cost O(output length) per request per step. Passing a ListPrefix defers that copy.
    """

    __slots__ = ("items", "start", "end")

    def __init__(self, items: list, start: int, end: int):
        self.items, self.start, self.end = items, start, end


_NEW_LIST = object()  # default of delta_token_ids: a new empty list


class EngineDeadError(RuntimeError):
    """The engine cannot go on (the CUDA context is lost, say): every request in flight is lost,
    and every later call raises this again. Callers tell it apart from a failure of one request
    (finish_reason "error") or of one step (its requests fail, the engine goes on)."""


@dataclass(init=False)
class CompletionOutput:
    index: int  # which of the request's n outputs
    text: str
    token_ids: list[int]  # given as a list or a ListPrefix; always read as a list of its own
    cumulative_logprob: float
    logprobs: list[dict[int, float]] | None  # per token {token_id: logprob}, when asked for
    finish_reason: str | None  # None while running; "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[dict[int, float]] | None = None
    error: str | None = None  # the cause, when finish_reason is "error"

    def __init__(self, index: int, text: str, token_ids: list[int] | ListPrefix,
                 cumulative_logprob: float, logprobs: list[dict[int, float]] | ListPrefix | None,
                 finish_reason: str | None, stop_reason: str | int | None = None,
                 delta_text: str = "", delta_token_ids: list[int] = _NEW_LIST,
                 delta_logprobs: list[dict[int, float]] | None = None, error: str | None = None):
        # Written out rather than generated: token_ids and logprobs are stored behind the
        # properties below, and plain stores keep this cheap (the engine makes one per running
        # request per step).
        self.index = index
        self.text = text
        self._token_ids = token_ids
        self.cumulative_logprob = cumulative_logprob
        self._logprobs = logprobs
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason
        self.delta_text = delta_text
        self.delta_token_ids = [] if delta_token_ids is _NEW_LIST else delta_token_ids
        self.delta_logprobs = delta_logprobs
        self.error = error

    def finished(self) -> bool:
        """Whether this output has ended (a method, as vLLM's CompletionOutput.finished is;
        RequestOutput.finished is a field)."""
        return self.finish_reason is not None


def _copied_on_read(name: str) -> property:
    """The field stored under _name; a ListPrefix there turns into a list when first read."""
    key = "_" + name

    def get(self):
        value = self.__dict__[key]
        if type(value) is ListPrefix:
            value = self.__dict__[key] = value.items[value.start : value.end]
        return value

    def set(self, value):
        self.__dict__[key] = value

    return property(get, set)


# Set after @dataclass, which would otherwise take a class-level property for the field's default.
CompletionOutput.token_ids = _copied_on_read("token_ids")
CompletionOutput.logprobs = _copied_on_read("logprobs")


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # Per prompt token {token id: logprob} (its own and the top-k), None for the first; set
    # when SamplingParams.prompt_logprobs is.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # Each prompt token's rank in the vocabulary (1: the model's best guess), None for the
    # first: what vLLM's Logprob.rank says of it.
    prompt_logprob_ranks: list[int | None] | None = None
    num_created_cache_tokens: int = 0  # prompt tokens whose KV it wrote to the prefix cache


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """`later` carrying `earlier`'s deltas ahead of its own: one output that a reader who has read
    neither takes instead of the two, and that reads as both (vLLM's RequestOutputCollector).

    `later` already holds the whole state (text, token ids, logprobs, finish and stop reasons,
    usage counts); only the deltas are joined. `earlier` is used up: its delta lists are reused.
    """
    for old, new in zip(earlier.outputs, later.outputs, strict=True):  # the same n, in order
        old.delta_token_ids += new.delta_token_ids
        new.delta_token_ids = old.delta_token_ids
        if old.delta_logprobs is not None:
            old.delta_logprobs += new.delta_logprobs
            new.delta_logprobs = old.delta_logprobs
        # NOTE: this copies the text not read yet, O(text) per step, as the processor's `text`
        # already costs; a list of pieces would save it but leave every reader a join to do.
        new.delta_text = old.delta_text + new.delta_text
    return later


@dataclass
class BeamSearchSequence:
    """One sequence of LLM.beam_search (vLLM's shape): prompt and output together."""

    tokens: list[int]
    logprobs: list[dict[int, float] | None]  # None for the prompt's tokens
    cum_logprob: float
    text: str
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first
