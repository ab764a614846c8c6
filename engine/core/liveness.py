"""Is the engine core alive? The API process's judgement (engine/core_client.py asks; stdlib
only).

A core that dies is seen at once (its process's sentinel). One that hangs is not: stopped
(SIGSTOP), or stuck in a kernel, a deadlock or an endless loop, it keeps its sockets open and
says nothing. So the core speaks even when it has nothing to say: a thread of its own sends a
heartbeat every HEARTBEAT_S without another message, carrying the number of turns its busy loop
has made (engine/core_process.py). The Watchdog hears both and fails the core when

  - nothing at all came for `engine_heartbeat_timeout` s: the process is not running (stopped,
    or a call that holds the GIL never returns), or
  - the loop made no turn for `engine_step_timeout` s while requests were in flight: heartbeats
    come, so the process runs, but its loop is stuck (a hung kernel, a deadlock).

The heartbeat comes from a thread, not from the loop, because one step may rightly take long (a
prefill chunk on the cpu, a kernel compiled at first use): a loop that only spoke between steps
could not tell such a step from a hang, and one limit would have to be longer than any step.
Split, a stopped process is caught in seconds, and only a stuck loop waits for the longer limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

HEARTBEAT_S = 0.5  # the core's heartbeat interval, when nothing else went out meanwhile
CHECK_EVERY_S = 0.5  # how often the API process judges
MIN_HEARTBEAT_TIMEOUT_S = 2.0  # a few heartbeats (a beat may come up to 2 x HEARTBEAT_S apart)


@dataclass(frozen=True)
class Liveness:
    """How long the API process waits on a silent core, and on a core whose loop is stuck with
    requests in flight, before it fails the core as if it had died (0: never)."""

    engine_heartbeat_timeout: float = 10.0
    engine_step_timeout: float = 300.0

    def __post_init__(self):
        hb, step = self.engine_heartbeat_timeout, self.engine_step_timeout
        if not (hb == 0 or hb >= MIN_HEARTBEAT_TIMEOUT_S):  # also refuses NaN
            raise ValueError(f"engine_heartbeat_timeout must be 0 (off) or at least "
                             f"{MIN_HEARTBEAT_TIMEOUT_S:g} s, got {hb:g}")
        if not (step == 0 or step >= 1):
            raise ValueError(f"engine_step_timeout must be 0 (off) or at least 1 s, got {step:g}")


DEFAULT_LIVENESS = Liveness()


class Watchdog:
    """One core's liveness, from what the API process hears of it. heard() on each message,
    verdict() every CHECK_EVERY_S; all times from `clock` (time.monotonic)."""

    def __init__(self, liveness: Liveness, clock=time.monotonic):
        self.liveness, self.clock = liveness, clock
        self.start()

    def start(self) -> None:
        """Count from now (the client attaches: what came before is not read yet)."""
        now = self.clock()
        self.last_heard = self.last_progress = self.last_check = now
        self.last_turn: int | None = None  # the loop's turn count in the last heartbeat
        self.busy_since: float | None = None  # when requests came in flight, while they are

    def heard(self, turn: int | None = None) -> None:
        """A message came: from the loop itself (turn None: a step's outputs, a command's
        answer), or a heartbeat carrying the loop's turn count."""
        now = self.clock()
        self.last_heard = now
        if turn is None or turn != self.last_turn:
            self.last_progress = now
        if turn is not None:
            self.last_turn = turn

    def verdict(self, busy: bool) -> str | None:
        """Why the core is to be failed, or None. `busy`: requests are in flight."""
        now = self.clock()
        held_up, self.last_check = now - self.last_check > 2 * CHECK_EVERY_S, now
        if not busy:
            self.busy_since = None
        elif self.busy_since is None:
            self.busy_since = now
        if held_up:
            # This process was not running (its event loop blocked, or it was stopped itself):
            # what the core sent meanwhile waits unread. Judge after reading it.
            return None
        silent, limit = now - self.last_heard, self.liveness.engine_heartbeat_timeout
        if limit and silent > limit:
            return (f"engine core unresponsive for {silent:.1f} s: nothing heard from its process, "
                    f"not even a heartbeat (--engine-heartbeat-timeout {limit:g})")
        limit = self.liveness.engine_step_timeout
        if busy and limit:
            stuck = now - max(self.last_progress, self.busy_since)
            if stuck > limit:
                return (f"engine core unresponsive for {stuck:.1f} s: its loop made no progress "
                        f"with requests in flight (--engine-step-timeout {limit:g})")
        return None
