"""The API process's half of the engine: the core runs in its own process (engine/core_client.py;
with data_parallel_size > 1, several cores behind one DPClient, engine/dp_client.py); here, on
the event loop, live the tokenizer and the OutputProcessor (text, stop strings).

Handlers submit requests through a RequestGroup and read RequestOutputs from its queue. One task
reads the core's messages (one per step; answers to commands may go ahead in one of their own),
turns them into RequestOutputs and hands each to its group; nothing here blocks the loop: sends
never wait (handlers tokenize long texts in threads). A reader that falls behind (a stalled
stream) finds one output per request, its unread steps merged, so what the group holds stays the
size of the text, not of every step's copy of it.
If the core dies, or hangs (engine/core/liveness.py: the client fails it and kills it), every
request in flight gets an EngineFault naming the cause, /health turns 503, and `on_fatal` (the
CLI stops the server with a non-zero exit) is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from engine.core.liveness import DEFAULT_LIVENESS, Liveness
from engine.core.outputs import EngineCoreRequest, merge_outputs
from engine.core.sampling_params import ParamError
from engine.core_client import MPClient
from engine.dp_client import DPClient, core_client_for
from engine.logs import StatsLogger
from engine.model.config import EngineConfig, ModelConfig
from engine.model.loader import generation_defaults, load_tokenizer
from engine.output_processor import OutputProcessor
from engine.structured_outputs import GrammarCompiler
from server.timeline import ACCEPTED, SENT, Timeline

log = logging.getLogger("pagedserve.engine")


class EngineFault(RuntimeError):
    """The engine core failed; the requests in flight were failed with this message."""


@dataclass
class ModelInfo:
    """What handlers read about the served model (what `ready_engine` returns)."""

    tokenizer: object | None
    model_config: ModelConfig
    max_model_len: int
    num_kv_blocks: int
    # Structured outputs are compiled here too, before submission, so a grammar that does not
    # compile is the call's 400 (engine/structured_outputs.py); None without a tokenizer.
    grammars: object | None = None
    # What a request leaves unset takes from the model's generation_config.json (vLLM's
    # --generation-config): SamplingParams fields (server/protocol.parse_sampling_params)
    sampling_defaults: dict | None = None


class RequestGroup:
    """The engine requests of one HTTP call (one per prompt), sharing one output queue.

    Use as `async with`: leaving it, normally or by an exception or cancellation (client gone),
    aborts every request still unfinished, so no error path leaves work in the engine.
    """

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.unfinished: set[str] = set()
        # RequestOutputs (or an EngineFault) not read yet, and the reader's wake-up while it
        # waits: a list, not an asyncio.Queue, so a reader takes all it holds at once, and a
        # step's hand-out costs an append (issue 11: the loop is busy with thousands a second).
        self._items: list = []
        self._wake: asyncio.Future | None = None
        # request id -> where in _items its unread output is: the next one merges into it
        self._unread: dict[str, int] = {}

    def put(self, item) -> None:
        """Hand the group a RequestOutput, or the EngineFault that ends it. An output of a request
        whose last one is still unread replaces it, carrying both steps' deltas: each output holds
        its whole text so far, and a stream stalled for n steps would otherwise hold n copies."""
        items = self._items
        if isinstance(item, EngineFault):
            self._unread.clear()  # nothing after it merges into what comes before it
            items.append(item)
        elif (i := self._unread.get(item.request_id)) is not None:
            items[i] = merge_outputs(items[i], item)
        else:
            self._unread[item.request_id] = len(items)
            items.append(item)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def add(self, request_id: str, prompt: dict, params):
        """Hand one request to the engine core; its rejection (ValueError, ParamError naming
        the field) is raised here. `prompt`: {"prompt_token_ids": [...], "prompt": text or
        absent}; handlers tokenize, off the event loop when long (server/handlers.py)."""
        self.engine.check_new_id(request_id)
        self.unfinished.add(request_id)  # before the await: a cancel must still abort it
        try:
            await self.engine._submit(self, request_id, prompt.get("prompt"),
                                      prompt["prompt_token_ids"], params)
        except BaseException:
            self.unfinished.discard(request_id)
            # Cancelled (the client left) while the core accepts it: it was sent, so it must
            # be aborted, or it would run to its end for no one. (Unless the id is another
            # group's: one that took it while this one waited for its aborted namesake.)
            if self.engine._groups.get(request_id, self) is self:
                self.engine.abort(request_id)
            raise

    async def outputs(self) -> AsyncIterator:
        """The group's RequestOutputs, until all its requests finish: of each request, in order,
        every step's output, or one for the steps handed over while the reader was away."""
        async for batch in self.batches():
            for item in batch:
                yield item

    async def batches(self) -> AsyncIterator[list]:
        """outputs(), as lists of what was handed over while the reader was away (one output
        per request: put() merges its steps), which an SSE stream writes at once (one send, not
        one each). An EngineFault is raised after the outputs handed over before it."""
        while self.unfinished:
            if not self._items:
                self._wake = asyncio.get_running_loop().create_future()
                await self._wake
            items, self._items = self._items, []
            self._unread.clear()
            batch = []
            for item in items:
                if isinstance(item, EngineFault):  # leaving the group aborts the others
                    if batch:
                        yield batch
                    raise item
                if item.finished:
                    self.unfinished.discard(item.request_id)
                batch.append(item)
            yield batch

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
    def __init__(self, engine_config: EngineConfig, make_core=None, metrics=None,
                 on_fatal: Callable[[str], None] | None = None,
                 liveness: Liveness = DEFAULT_LIVENESS, chat_template: str | None = None):
        """`make_core`: a picklable callable the core process calls instead of
        EngineCore(engine_config); `on_fatal(cause)`: called once if the core dies (or hangs:
        `liveness` says when one is failed); `chat_template`: a template's source that renders
        chats in place of the model's (Tokenizer.use_chat_template)."""
        self.config, self.make_core = engine_config, make_core
        self.chat_template = chat_template
        self.metrics, self.on_fatal, self.liveness = metrics, on_fatal, liveness
        self.engine: ModelInfo | None = None  # set once the core is ready
        self.load_error: BaseException | None = None
        self.dead: str | None = None  # why the core died
        self.stats = None  # the core's last EngineStats
        self.client: MPClient | DPClient | None = None  # DPClient: data_parallel_size > 1
        self.processor: OutputProcessor | None = None
        self._groups: dict[str, RequestGroup] = {}  # request id -> its group, while unfinished
        self._pending: dict[str, asyncio.Future] = {}  # sent, not yet accepted by the core
        # sent, not yet answered by the core (accepted or rejected), aborted or not: a request
        # id used again waits for it (engine/core_process.py answers each ADD in turn)
        self._unanswered: dict[str, asyncio.Future] = {}
        self._waiting: set[str] = set()  # requests sent that have no output yet
        self._snapshots: dict[int, asyncio.Future] = {}  # ticket -> the dashboard's waiter
        self._tickets = itertools.count()
        self._task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stats_log = StatsLogger()  # the "every 10 s while busy" line
        self.timeline = Timeline()  # where first tokens wait (GET /debug/first_token)
        # Requests past the --max-waiting-requests check whose call has not handed them to the
        # core yet (tokenizing, or a non-streamed call's task not started): counted with the
        # waiting ones, so that a burst cannot pass the check together.
        self.admitting = 0
        self.ending = False  # end_all ran: the server is stopping

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and self.dead is None

    @property
    def num_waiting_requests(self) -> int:
        """Requests (not sequences: n does not count) sent to the core that have no output yet;
        what --max-waiting-requests bounds."""
        return len(self._waiting)

    def load(self) -> list[str]:
        """Spawn the core and wait until its model is loaded (the CLI, before it serves); raise
        what loading raised. Returns the core's start-up lines (device, memory, graphs)."""
        self.client = core_client_for(self.config, self.make_core, self.liveness)
        try:  # (start() cleans up after itself; a signal between it and wait_ready is caught)
            self.client.start()
            ready = self.client.wait_ready()
            # after: HF ids are cached
            self._set_ready(ready, load_tokenizer(self.config.model),
                            generation_defaults(self.config))
        except BaseException:
            self.client.shutdown()
            raise
        return ready.summary

    def start(self):
        """On the event loop: serve from a core load() made ready, or else spawn one (from this
        thread, whose life the core's is tied to) and load it in the background meanwhile."""
        if self.client is None:
            self.client = core_client_for(self.config, self.make_core, self.liveness)
            self.client.start()
        self.loop = asyncio.get_running_loop()  # handlers run here, and only here
        self._task = self.loop.create_task(self._run())

    def _set_ready(self, ready, tokenizer, sampling_defaults: dict):
        if tokenizer is not None and self.chat_template is not None:  # (without one: no chat)
            tokenizer.use_chat_template(self.chat_template)
        self.engine = ModelInfo(tokenizer, ready.model_config, ready.max_model_len,
                                ready.num_kv_blocks,
                                self._grammars(tokenizer, ready.model_config), sampling_defaults)
        self.processor = OutputProcessor(tokenizer)
        if tokenizer is None:
            log.warning("this model has no tokenizer: text prompts, chat and /tokenize answer "
                        "400; send token ids")

    async def shutdown(self):
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task  # off the output socket before the client closes it
        if self.client is not None:
            await asyncio.to_thread(self.client.shutdown)

    def group(self) -> RequestGroup:
        return RequestGroup(self)

    def check_new_id(self, request_id: str) -> None:
        """TypeError for an id that is no str: it crosses to the core as one (whose decoder
        refuses anything else); ValueError for one a request in flight has."""
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
        if request_id in self._groups or (self.processor is not None
                                          and self.processor.has_request(request_id)):
            raise ValueError(f"request_id {request_id!r} is already in use")

    async def _submit(self, group: RequestGroup, request_id: str, text, ids, params):
        # An id used again right after its request was aborted (or ended by a stop string):
        # sent only once the core answered the first, so each answer, and each output the
        # core sent before it read the abort (_handle drops those), is the first one's.
        while (previous := self._unanswered.get(request_id)) is not None:
            await asyncio.shield(previous)
            self.check_new_id(request_id)  # another call may have taken it meanwhile
        if self.dead is not None:
            raise EngineFault(f"the engine core died: {self.dead}")
        arrival = time.time()
        self.processor.add_request(request_id, text, ids, params, arrival)  # may raise
        if self.ending:  # a call's later prompt after end_all: it ends as the others did
            group.put(self.processor.abort(request_id))
            return
        accepted = asyncio.get_running_loop().create_future()
        self._pending[request_id] = accepted
        self._groups[request_id] = group
        self._waiting.add(request_id)
        self.timeline.stamp(request_id, SENT)
        self.client.add_request(EngineCoreRequest(request_id, ids, params, arrival))
        self._unanswered[request_id] = asyncio.get_running_loop().create_future()  # once sent
        await accepted
        self.timeline.stamp(request_id, ACCEPTED)

    async def snapshot(self, since: int | None) -> dict:
        """The dashboard's hook: EngineCore.snapshot(since), taken by the core between two steps;
        LookupError while the core is not running."""
        if not self.is_ready:
            raise LookupError("the engine is not running")
        ticket = next(self._tickets)
        future = self._snapshots[ticket] = asyncio.get_running_loop().create_future()
        self.client.request_snapshot(ticket, since)
        try:
            snap = await future
        finally:
            self._snapshots.pop(ticket, None)
        if "error" in snap:
            raise RuntimeError(f"the engine's snapshot failed: {snap['error']}")
        return snap

    def abort(self, request_id: str):
        """Stop a request wherever it is: its final output (finish_reason "abort"), or None when
        it had already finished (or the core died, taking every request with it)."""
        accepted = self._pending.pop(request_id, None)
        if accepted is not None and not accepted.done():
            accepted.set_result(None)  # its caller reads the final output (end_all) or has left
        self._groups.pop(request_id, None)
        self._waiting.discard(request_id)
        if self.dead is not None:
            return None
        final = self.processor.abort(request_id) if self.processor is not None else None
        if final is not None:
            self.client.abort_requests([request_id])
            if self.metrics:
                self.metrics.on_aborted(final)
        return final

    def end_all(self) -> int:
        """The server is shutting down: end every request in flight with finish_reason "abort",
        handing each its final output, so that a stream sends its last chunk and [DONE] and a
        waiting call answers, instead of being cut off when the drain runs out. Returns how
        many there were."""
        self.ending = True
        ended = 0
        for request_id, group in list(self._groups.items()):
            final = self.abort(request_id)
            if final is not None:
                group.put(final)
                ended += 1
        return ended

    # ------------------------------------------------------------ the core's messages

    async def _run(self):
        if self.engine is None:
            try:
                ready = await asyncio.to_thread(self.client.wait_ready)
                tokenizer = await asyncio.to_thread(load_tokenizer, self.config.model)
                defaults = await asyncio.to_thread(generation_defaults, self.config)
                self._set_ready(ready, tokenizer, defaults)
            except Exception as e:  # reported by /health; the server stays up to say why
                log.error("loading the engine failed: %s", e)
                self.load_error = e
                return
            log.debug("engine ready")
        self.client.attach(busy=self._has_work)
        if isinstance(self.client, DPClient) and self.metrics:
            self.metrics.core_stats = self.client.core_stats  # updated in place
        try:
            while True:
                message = await self.client.get_output_async()
                if message.first_token_times:
                    self.timeline.core_stamps(message.first_token_times, message.sent_time,
                                              time.monotonic())
                self._handle(message)
                if message.fatal is not None:
                    self._die(message.fatal)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here would otherwise hang every request silently
            log.exception("handling the engine core's output failed")
            self._die(f"the API process failed on the core's output: {type(e).__name__}: {e}")
        finally:
            # Nobody reads the core's messages from here on (the engine is dead, or shutting
            # down): its heartbeats would wait unread, and a live core be failed as silent.
            self.client.detach()

    def _has_work(self) -> bool:
        """Someone waits on the core: a request in flight, or a dashboard snapshot."""
        return bool(self._groups or self._snapshots)

    def _grammars(self, tokenizer, model_config):
        if tokenizer is None:
            return None
        observe = self.metrics.grammar_compile_seconds.observe if self.metrics else None
        return GrammarCompiler.for_model(tokenizer, model_config, on_compile=observe)

    def _handle(self, message):
        for ticket, snap in message.snapshots:
            future = self._snapshots.get(ticket)
            if future is not None and not future.done():  # the feed may have timed out
                future.set_result(snap)
        pending = self._pending
        for request_id in (*message.accepted, *(r[0] for r in message.rejected)):
            answered = self._unanswered.pop(request_id, None)
            if answered is not None:
                answered.set_result(None)
        for request_id in message.accepted:
            future = pending.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(None)
        for request_id, field, why in message.rejected:
            future = pending.pop(request_id, None)
            self._groups.pop(request_id, None)
            self._waiting.discard(request_id)
            self.processor.abort(request_id)
            if future is not None and not future.done():
                future.set_exception(ParamError(field, why) if field else ValueError(why))
        num_outputs = 0
        outputs = message.outputs
        if outputs and pending:
            # A request has no output before the core accepted it: one under its id is of an
            # aborted request that had it, sent before the core read the abort.
            outputs = [out for out in outputs if out.request_id not in pending]
        if outputs:
            results, stopped = self.processor.process(outputs)
            if stopped:
                self.client.finish_sequences(stopped)
            num_outputs = len(results)
            groups, waiting = self._groups, self._waiting
            if message.first_token_times:
                # First tokens first: their streams wake (and write) ahead of the others'.
                results.sort(key=lambda out: out.request_id not in waiting)
            for out in results:
                group = groups.get(out.request_id)
                if group is None:
                    continue
                waiting.discard(out.request_id)
                if out.finished:
                    del groups[out.request_id]
                    errors = [c.error for c in out.outputs if c.finish_reason == "error"]
                    if errors:  # this request alone failed (its sampling, stop check, text)
                        group.put(EngineFault(
                            f"the engine failed while running this request: {errors[0]}"))
                        if self.metrics:
                            self.metrics.on_ended("error")
                        continue
                    if self.metrics:
                        self.metrics.on_finished(out)
                group.put(out)
        if message.stats is not None:
            self.stats = message.stats
            if self.metrics:
                self.metrics.on_step(num_outputs, message.stats)
            self._stats_log.on_stats(message.stats)

    def _die(self, cause: str):
        if self.dead is not None:
            return
        self.dead = cause
        log.error("the engine core died: %s; failing %d requests", cause, len(self._groups))
        fault = EngineFault(f"the engine core died: {cause}")
        for future in self._snapshots.values():
            if not future.done():
                future.set_exception(LookupError("the engine is not running"))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(fault)
        for future in self._unanswered.values():  # a waiting namesake raises the fault itself
            future.set_result(None)
        self._unanswered.clear()
        for group in set(self._groups.values()):
            group.put(fault)
        if self.metrics and self._groups:
            self.metrics.on_ended("error", len(self._groups))
        self._pending.clear()
        self._groups.clear()
        self._waiting.clear()
        if self.on_fatal is not None:
            self.on_fatal(cause)

