"""Speculative decoding in the engine core: when a step speculates, the drafts of its decodes,
the verdict on them, and the counters.

While at most disable_by_batch_size sequences run, each decode proposes drafts from its own tokens
(ngram_proposer.py) and the step verifies them: the scheduler gives it 1 + k tokens, the runner
samples all 1 + k positions (step_inputs.py, sampling_inputs.DraftRow), and the engine core keeps
what `verify` says and rolls back the KV slots of the rest (BlockManager.truncate). Such a step is
synchronous: the step in flight is read first, so proposals see every token, and the verdict is
known before the next schedule; larger batches keep the overlapped loop.

Verification samples each position as plain decoding would (same seed step, same history) and
keeps drafts while they equal the token sampled before them, then that token. For a
deterministic proposal x this is exactly rejection sampling: x is kept with probability p(x), and
otherwise the token is a draw from p without x, renormalized. It also makes greedy and seeded
outputs identical to plain decoding, so penalties, logit_bias, min_tokens, logprobs and every
stop rule see exactly the accepted tokens. A sequence whose n - 1 forks still wait on its prompt
does not draft (they fork from its computed tokens), nor do beam search's sequences, and no step
speculates while a structured-output request runs or waits (engine_core).
"""

from __future__ import annotations

from engine.core.sequence import Sequence, SequenceStatus
from engine.model.config import SpeculativeConfig
from engine.ngram_proposer import NgramProposer


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.proposer = NgramProposer(config)
        self.num_drafts = 0  # sequence-steps that verified drafts
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        # [i]: sequence-steps that accepted i drafts (what tools/bench_spec.py replays)
        self.accepted_hist = [0] * (config.num_speculative_tokens + 1)

    def should_speculate(self, scheduler) -> bool:
        return 0 < scheduler.num_running <= self.config.disable_by_batch_size

    def propose(self, running: list[Sequence]) -> list[Sequence]:
        """Set the drafts of the running decodes; return the sequences that got some (the engine
        core empties their spec_token_ids after the step)."""
        status = SequenceStatus.RUNNING
        # NOTE: constrained sequences never reach here: EngineCore.step does not speculate while
        # one runs or waits (row j's mask would need the matcher advanced through j drafts).
        # NOTE: beams never speculate: a beam step reads one row's top candidates for every beam
        # (engine/beam_search.py), and its forks share blocks a rollback would have to respect.
        decodes = [s for s in running if s.status is status and not s.forks
                   and not s.sampling_params.use_beam_search
                   and len(s.token_ids) - s.num_computed_tokens == 1]
        drafted = []
        for seq, draft in zip(decodes, self.proposer.propose(decodes), strict=True):
            if draft:
                seq.spec_token_ids = draft
                drafted.append(seq)
        return drafted

    def verify(self, seq: Sequence, tokens: list[int], first: int) -> int:
        """How many of the sampled rows first.. the sequence takes: its drafts while each equals
        the token sampled at its position, then the first that differs (or the bonus token
        after the last draft)."""
        draft = seq.spec_token_ids
        num_accepted = 0
        while num_accepted < len(draft) and tokens[first + num_accepted] == draft[num_accepted]:
            num_accepted += 1
        self.num_drafts += 1
        self.num_draft_tokens += len(draft)
        self.num_accepted_tokens += num_accepted
        self.accepted_hist[num_accepted] += 1
        return num_accepted + 1

    def stats(self) -> dict:
        """EngineStats' spec fields."""
        return {"spec_num_drafts": self.num_drafts,
                "spec_num_draft_tokens": self.num_draft_tokens,
                "spec_num_accepted_tokens": self.num_accepted_tokens}
