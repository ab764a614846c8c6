"""The engine on its own thread, fed by asyncio handlers through a command queue.

The engine is not thread-safe, so exactly one thread ever calls add_request / abort / step: the
engine thread. Handlers append ("add" | "abort") commands and wake it; it drains the commands
before each step and steps while any request is unfinished, then sleeps on a condition. Outputs go
back to each request's asyncio.Queue through loop.call_soon_threadsafe, so neither side ever
blocks the other.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from engine.logs import StatsLogger

log = logging.getLogger("pagedserve.engine")


class EngineFault(RuntimeError):
    """engine.step() raised; the requests in flight were failed and the engine keeps serving."""


@dataclass(eq=False)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # the group's: RequestOutputs and EngineFaults of all its requests
    accepted: asyncio.Future  # resolved once add_request returned (or raised)
    is_waiting: bool = True  # no output yet


def _deliver(stream: _Stream, callback, *args) -> bool:
    """Run `callback(*args)` on the stream's event loop; False if that loop has closed (its
    handler is gone for good), which must not kill the engine thread."""
    try:
        stream.loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        return False
    return True


def _resolve(future: asyncio.Future, error: BaseException | None):
    _settle(future, None, error)


def _settle(future: asyncio.Future, result, error: BaseException | None):
    if future.done():  # the handler gave up waiting (client gone)
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class RequestGroup:
    """The engine requests of one HTTP call (one per prompt), sharing one output queue.

    Use as `async with`: leaving it, normally or by an exception or cancellation (client gone),
    aborts every request still unfinished, so no error path leaves work in the engine.
    """

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.queue: asyncio.Queue = asyncio.Queue()
        self.unfinished: set[str] = set()

    async def add(self, request_id: str, prompt, params):
        """Hand one request to the engine; add_request's ValueError is raised here."""
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, self.queue, loop.create_future())
        self.unfinished.add(request_id)  # before the await: a cancel must still abort it
        self.engine._send(("add", request_id, prompt, params, stream))
        try:
            await stream.accepted
        except Exception:
            self.unfinished.discard(request_id)  # rejected: it never entered the engine
            raise

    async def outputs(self) -> AsyncIterator:
        """Every RequestOutput of the group's requests, in arrival order, until all finish."""
        while self.unfinished:
            item = await self.queue.get()
            if isinstance(item, EngineFault):  # leaving the group aborts the others
                raise item
            if item.finished:
                self.unfinished.discard(item.request_id)
            yield item

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()

    def close(self):
        """Abort every request of the group still unfinished (safe to call twice)."""
        for request_id in self.unfinished:
            self.engine.abort(request_id)
        self.unfinished.clear()


class AsyncEngine:
    def __init__(self, make_engine: Callable[[], object], metrics=None):
        self._make_engine = make_engine
        self.metrics = metrics
        self.engine = None  # set on the engine thread once loaded
        self.load_error: BaseException | None = None
        self._commands: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._num_waiting = 0  # streams with is_waiting; written by the engine thread only
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = None  # last get_stats(); read by handlers, replaced whole by the thread
        self._stats_log = StatsLogger()  # the "every 10 s while busy" line
        self.busy_s = 0.0  # time spent inside engine.step(), for the dashboard's step time

    # ------------------------------------------------------------ handler side (event loop)

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and self.stats is not None

    @property
    def num_waiting_requests(self) -> int:
        """Requests (not sequences: n does not count) admitted that have no output yet, plus
        those not yet handed to the engine; what --max-waiting-requests bounds."""
        pending = sum(1 for c in list(self._commands) if c[0] == "add")
        return self._num_waiting + pending

    def start(self):
        self._thread = threading.Thread(target=self._run, name="pagedserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0):
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def group(self) -> RequestGroup:
        return RequestGroup(self)

    def abort(self, request_id: str):
        self._send(("abort", request_id))

    async def snapshot(self, since: int | None) -> dict:
        """The dashboard's hook: LLMEngine.snapshot(since), taken by the engine thread between
        two steps (the engine is not thread-safe); LookupError while the engine is not ready."""
        if not self.is_ready or self._thread is None or not self._thread.is_alive():
            raise LookupError("the engine is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._send(("snapshot", since, loop, future))
        snap = await future
        snap["stats"]["busy_s"] = self.busy_s
        return snap

    def _send(self, command: tuple):
        with self._wake:
            self._commands.append(command)
            self._wake.notify()

    # ------------------------------------------------------------ engine thread

    def _run(self):
        try:
            self.engine = self._make_engine()
            self._publish_stats(0)
        except BaseException as e:  # reported by /health; `pagedserve serve` loads the engine
            # before it starts serving and exits non-zero instead, so only apps built with a lazy
            # make_engine get here
            log.exception("loading the engine failed")
            self.load_error = e
            return
        log.debug("engine ready")
        if getattr(self.engine, "tokenizer", None) is None:
            log.warning("this model has no tokenizer: text prompts, chat and /tokenize answer "
                        "400; send token ids")
        while True:
            with self._wake:
                while not (self._commands or self._stopping
                           or self.engine.has_unfinished_requests()):
                    self._wake.wait()
                if self._stopping:
                    return
                commands = list(self._commands)
                self._commands.clear()
            for command in commands:
                self._apply(command)
            if self.engine.has_unfinished_requests():
                self._step()

    def _apply(self, command: tuple):
        if command[0] == "add":
            _, request_id, prompt, params, stream = command
            try:
                self.engine.add_request(request_id, prompt, params)
            except Exception as e:  # a bad request; the handler turns it into a 400
                _deliver(stream, _resolve, stream.accepted, e)
                return
            self._streams[request_id] = stream
            self._num_waiting += 1
            _deliver(stream, _resolve, stream.accepted, None)
        elif command[0] == "snapshot":
            _, since, loop, future = command
            start = time.perf_counter()
            try:
                snap, error = self.engine.snapshot(since), None
                snap["cost_s"] = time.perf_counter() - start  # the feed slows down if it grows
            except Exception as e:  # a dashboard bug must never stop the engine
                snap, error = None, e
            loop.call_soon_threadsafe(_settle, future, snap, error)
        else:
            request_id = command[1]
            if (stream := self._streams.pop(request_id, None)) is not None:
                self._num_waiting -= stream.is_waiting
                self.engine.abort(request_id)
                if self.metrics:
                    self.metrics.on_ended("abort")

    def _step(self):
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception:
            log.exception("engine step failed; failing the requests in flight")
            self._fail_all()
            self._publish_stats(0)
            return
        finally:
            self.busy_s += time.perf_counter() - start
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if stream.is_waiting:
                stream.is_waiting = False
                self._num_waiting -= 1
            if out.finished:
                del self._streams[out.request_id]
                errors = [c.error for c in out.outputs if c.finish_reason == "error"]
                if errors:  # this request alone failed (its sampling, stop check, text)
                    fault = EngineFault(f"the engine failed while running this request: "
                                        f"{errors[0]}")
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, fault)
                    if self.metrics:
                        self.metrics.on_ended("error")
                    continue
                if self.metrics:
                    self.metrics.on_finished(out)
            if not _deliver(stream, stream.queue.put_nowait, out) and not out.finished:
                self._apply(("abort", out.request_id))
        self._publish_stats(len(outputs))

    def _fail_all(self):
        # Which sequences the failed step held is the scheduler's secret; every request in flight
        # may share its corrupted state, so all of them are failed and aborted.
        streams, self._streams = self._streams, {}
        self._num_waiting = 0
        for request_id, stream in streams.items():
            try:
                self.engine.abort(request_id)
            except Exception:
                log.exception("abort of %s after an engine fault failed", request_id)
            error = EngineFault("the engine failed while running this request")
            _deliver(stream, stream.queue.put_nowait, error)
        if self.metrics and streams:
            self.metrics.on_ended("error", len(streams))

    def _publish_stats(self, num_outputs: int):
        self.stats = self.engine.get_stats()
        if self.metrics:
            self.metrics.on_step(num_outputs, self.stats)
        self._stats_log.on_stats(self.stats)
