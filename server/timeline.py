"""Where a request's first token waits: a stamp for each stage of its way from the HTTP handler to
its first SSE chunk, read by `GET /debug/first_token` and `tools/bench_serving.py --stages`.

    arrived       the generation handler starts (body not read yet)        API process
    tokenized     its token ids are ready and checked
    sent          its ADD left for the engine core
    received      the core took the ADD off its socket                     engine-core process
    scheduled     the core scheduled the first step that holds its prompt
    launched      the step that made its first token was launched
    sampled       that step's tokens were read back by the core
    core_sent     the core sent the message carrying that token (postprocessed)
    api_received  the API process read that message                       API process
    accepted      its submission returned to the handler (the core's accept came back)
    first_chunk   the SSE chunk of its first token was written

Every stamp is time.monotonic(): CLOCK_MONOTONIC on Linux, one clock for every process of the
machine, so the core's stamps (carried in EngineCoreOutputs.first_token_times) and a client's on
the same host line up with these. Always on: about ten clock reads per request; the last
MAX_RECORDS requests are kept.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

STAGES = ("arrived", "tokenized", "sent", "received", "scheduled", "launched", "sampled",
          "core_sent", "api_received", "accepted", "first_chunk")
ARRIVED, TOKENIZED, SENT, RECEIVED, SCHEDULED, LAUNCHED, SAMPLED, CORE_SENT, API_RECEIVED, \
    ACCEPTED, FIRST_CHUNK = range(len(STAGES))
MAX_RECORDS = 4096


class Timeline:
    """request id -> its stamps (seconds of time.monotonic(); NaN until the stage is reached)."""

    def __init__(self, max_records: int = MAX_RECORDS):
        self.max_records = max_records
        self._records: OrderedDict[str, list[float]] = OrderedDict()

    def start(self, request_id: str, arrived: float, tokenized: float) -> None:
        record = [math.nan] * len(STAGES)
        record[ARRIVED], record[TOKENIZED] = arrived, tokenized
        self._records[request_id] = record
        if len(self._records) > self.max_records:
            self._records.popitem(last=False)

    def stamp(self, request_id: str, stage: int, when: float | None = None) -> None:
        """Note `stage` of a started request (now, or at `when`); only its first time counts."""
        record = self._records.get(request_id)
        if record is not None and math.isnan(record[stage]):
            record[stage] = time.monotonic() if when is None else when

    def core_stamps(self, first_token_times, core_sent: float, api_received: float) -> None:
        """The core's stamps of the requests whose first token a message carries."""
        for request_id, *core in first_token_times:  # received .. sampled
            record = self._records.get(request_id)
            if record is not None and math.isnan(record[RECEIVED]):
                record[RECEIVED:API_RECEIVED + 1] = [*core, core_sent, api_received]

    def as_json(self) -> dict:
        """{"stages": names, "requests": {request id: stamps, null where missing}}."""
        return {"stages": list(STAGES),
                "requests": {rid: [None if math.isnan(t) else t for t in record]
                             for rid, record in self._records.items()}}


def mark_arrival(request) -> None:
    """Stamp a generation call's arrival on its Starlette request, first thing in its handler."""
    request.state.arrived = time.monotonic()


def arrival_of(request) -> float:
    return getattr(request.state, "arrived", math.nan)
