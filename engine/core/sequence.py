"""One generation stream: its tokens, how many of them are in the KV cache, and its blocks.

Floor 1 (stdlib only). A request with n > 1 owns n sequences that share the prompt.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from engine.core.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    sampling_params: SamplingParams
    index: int = 0  # which of the request's n outputs this is
    seed: int = 0  # this sequence's sampling seed (drawn by the engine when the request has none)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose k/v are in the cache (prefix-cache hits included)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    admitted: bool = False  # allocated blocks once (a recompute after preemption finds its own)
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None  # why, when finish_reason is "error"
    cumulative_logprob: float = 0.0
    # Draft tokens this step verifies after the last token (speculative decoding): set by the
    # engine core's proposer, trimmed by the scheduler, empty in a step without speculation.
    spec_token_ids: list[int] = field(default_factory=list)
    # A request's other n - 1 sequences, held here until this one's prompt is computed; then
    # they fork from it (Scheduler.advance, once the step that finishes its prompt is launched)
    # instead of each computing the prompt again.
    forks: list[Sequence] = field(default_factory=list)
    # A token sampled by a launched step and not yet appended (overlapped steps read a step's
    # tokens after launching the next): set and cleared by the engine core; a waiting sequence
    # that has one is not admitted (its prompt would lack the token).
    has_pending_token: bool = False
    # prompt_logprobs: the prompt position whose logprob comes next (position 0 has none). The
    # runner computes rows for positions from here on; a recompute after preemption skips those
    # already collected, and the prefix cache may not cover the ones still wanted.
    next_prompt_logprob: int = 1
    # Structured outputs: the llguidance matcher this sequence advances (None: unconstrained),
    # and whether its grammar is still compiling (the scheduler leaves it waiting until then).
    matcher: object = None
    is_waiting_for_grammar: bool = False
    # A matcher that takes over (becomes `matcher`) once the output ends with
    # sampling_params.structured_outputs_after: the grammar holds from the token after those.
    later_matcher: object = None

    @property
    def wants_prompt_logprobs(self) -> bool:
        return (self.sampling_params.prompt_logprobs is not None
                and self.next_prompt_logprob < self.num_prompt_tokens)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model before this sequence can sample again; 0 while
        its last sampled token is pending (overlapped steps: still on the device, not yet in
        token_ids, and counted as computed by the step that sampled it)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
