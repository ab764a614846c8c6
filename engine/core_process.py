"""The engine-core process: EngineCore in a busy loop, fed and read over ZeroMQ.

    API process  --PUSH [kind, msgpack]-->  inputs   (ADD request | ABORT ids | FINISH seqs |
                                                      SNAPSHOT (the dashboard) | STOP)
                 <--PULL [kind, msgpack]--  outputs  (READY or FAILED once, then OUTPUTS per
                                                      loop turn; HEARTBEAT from a thread)

Each turn drains every waiting command, runs one step if any request is unfinished, and sends one
EngineCoreOutputs: the step's SeqOutputs, the requests accepted or rejected, the stats. What the
commands asked for (accepted, rejected, snapshots) goes ahead in a message of its own when a step
follows, so no answer waits for a step. Idle, it sleeps on the input socket, woken by the next
command. Token ids only cross; the API process holds the text. Each message and each request's
first token carry monotonic stamps (server/timeline.py: where a first token waits).

A thread of its own sends a HEARTBEAT (the loop's turn count) whenever HEARTBEAT_S passed
without another message, so the API process tells a stopped or stuck core from a long step
(engine/core/liveness.py); a busy loop's messages are its heartbeat, so steps pay nothing.

It never outlives the API process (PR_SET_PDEATHSIG on Linux, and a parent check every turn), and
a step that raises ends it: the last message names the error, the exit code is 1, and the API
process fails what was in flight rather than serve from a core whose state (or GPU) is suspect.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import pickle
import signal
import sys
import threading
import time
from dataclasses import dataclass

import msgspec
import zmq

from engine.core.liveness import HEARTBEAT_S
from engine.core.outputs import EngineCoreOutputs, EngineCoreRequest
from engine.engine_core import EngineCore
from engine.logs import configure_logging, engine_lines
from engine.model.config import EngineConfig, ModelConfig

logger = logging.getLogger("pagedserve.core_process")

# First frame of every message: what the second one holds.
ADD, ABORT, FINISH, SNAPSHOT, STOP = b"A", b"X", b"F", b"P", b"S"  # API -> core
READY, FAILED, OUTPUTS = b"R", b"E", b"O"  # core -> API (FAILED: loading raised; pickled)
HEARTBEAT = b"H"  # core -> API: the loop's turn count

IDLE_POLL_MS = 500  # how often an idle core checks that its parent lives


@dataclass
class CoreReady:
    """What the API process needs from the loaded core before it serves."""

    model_config: ModelConfig
    max_model_len: int
    num_kv_blocks: int
    summary: list[str]  # device, memory, graphs: the start-up lines the API process logs


def run_core_process(engine_config: EngineConfig, input_address: str, output_address: str,
                     parent_pid: int, make_core=None, log_level: str = "info",
                     cuda_devices: str | None = None) -> None:
    """The process entry. `make_core`: a picklable callable returning an EngineCore, in place of
    EngineCore(engine_config) (tests run tiny random models with it). `cuda_devices`: the GPUs
    this core may see (CUDA_VISIBLE_DEVICES; data parallel gives each core its own), or None
    to keep the API process's."""
    if cuda_devices is not None:
        # Read by CUDA when it initializes, which nothing imported so far has made it do.
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_devices
    _die_with_parent(parent_pid)
    # Ctrl-C, and a SIGTERM sent to the whole process group (systemd's default stop, `kill --
    # -PGID`), are the API process's to handle: it drains the requests in flight, then sends
    # STOP (and kills a core that does not stop; the core also dies with its parent). The
    # tensor-parallel workers it starts inherit both (an ignored signal stays ignored across
    # exec, and Python keeps an ignored SIGINT ignored), so they too wait for rank 0's STOP; a
    # `pagedserve worker` started by hand keeps its user's signals.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(log_level)  # the API process's format, on the same stderr
    # The loaders' progress bars: tqdm's default lock is a multiprocessing semaphore, which a
    # core stopped before it is ready (a bad flag found while loading) leaves for the API
    # process's resource tracker to warn about on exit. One process, one thread's lock.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    ctx = zmq.Context()
    inputs = ctx.socket(zmq.PULL)
    inputs.connect(input_address)
    outputs = ctx.socket(zmq.PUSH)
    outputs.connect(output_address)
    encode = msgspec.msgpack.Encoder().encode
    code = 1
    heartbeat = None
    try:
        try:
            core = make_core() if make_core is not None else EngineCore(engine_config)
        except Exception as e:
            # The API process raises it again, so its one-line report (or 400) stays its own.
            logger.debug("loading the engine core failed", exc_info=True)
            outputs.send_multipart([FAILED, _pickled(e)])
            return
        ready = CoreReady(core.model_config, core.max_model_len, core.num_kv_blocks,
                          engine_lines(core))
        outputs.send_multipart([READY, encode(ready)])
        # /metrics shows the engine's numbers from the start, not after the first request.
        outputs.send_multipart([OUTPUTS, encode(EngineCoreOutputs(stats=core.get_stats()))])
        loop = _BusyLoop(core, inputs, outputs, parent_pid)
        heartbeat = _Heartbeat(ctx, output_address, loop)
        try:
            code = loop.run()
        except Exception as e:  # outside the step (a command, the stats): named as a step's is
            logger.exception("the engine core failed; it exits")
            message = EngineCoreOutputs(fatal=f"the engine core failed: {_describe(e)}")
            outputs.send_multipart([OUTPUTS, encode(message)])
        core.shutdown()
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        outputs.close(linger=2000)  # the last message (maybe the fatal one) must get out
        inputs.close(linger=0)
        ctx.term()
        sys.exit(code)


class _BusyLoop:
    def __init__(self, core: EngineCore, inputs, outputs, parent_pid: int):
        self.core, self.inputs, self.outputs, self.parent_pid = core, inputs, outputs, parent_pid
        self.encode = msgspec.msgpack.Encoder().encode
        self.decoders = {ADD: msgspec.msgpack.Decoder(EngineCoreRequest),
                         ABORT: msgspec.msgpack.Decoder(list[str]),
                         FINISH: msgspec.msgpack.Decoder(list[tuple[str, int, str]]),
                         SNAPSHOT: msgspec.msgpack.Decoder(tuple[int, int | None])}
        self.busy_s = 0.0  # time inside core.step(), for the dashboard's step time
        # request id -> when its ADD was read (time.monotonic()), until its first output goes
        self.received: dict[str, float] = {}
        # Read by the heartbeat thread: turns begun (each idle poll or step), and when the last
        # OUTPUTS went (time.monotonic()).
        self.turns = 0
        self.last_sent = time.monotonic()

    def run(self) -> int:
        """Serve until told to stop (0) or a step fails (1); return the exit code."""
        core, inputs = self.core, self.inputs
        while True:
            self.turns += 1
            if not core.has_unfinished_requests() and not inputs.poll(IDLE_POLL_MS):
                if os.getppid() != self.parent_pid:
                    return 0
                try:
                    core.check_workers()
                except Exception as e:  # a dead tensor-parallel worker: the core cannot go on
                    logger.error("%s; the engine core exits", e)
                    message = EngineCoreOutputs(fatal=_describe(e))
                    self.outputs.send_multipart([OUTPUTS, self.encode(message)])
                    return 1
                continue
            message = EngineCoreOutputs()
            received, stop = self._drain(message)
            if stop or os.getppid() != self.parent_pid:
                return 0
            stepped = core.has_unfinished_requests()
            if stepped and (message.accepted or message.rejected or message.snapshots):
                # Answer the commands before the step: a handler starts its response (and a
                # client sees its 400) while the step runs, not after it.
                self._send(message)
                message = EngineCoreOutputs()
            if stepped:
                start = time.perf_counter()
                try:
                    message.outputs = core.step()
                except Exception as e:
                    logger.exception("engine step failed; the engine core exits")
                    message.fatal = f"engine step failed: {_describe(e)}"
                    self.outputs.send_multipart([OUTPUTS, self.encode(message)])
                    return 1
                self.busy_s += time.perf_counter() - start
                if self.received and message.outputs:
                    self._note_first_tokens(message)
            if received or stepped:
                message.stats = core.get_stats()
                self._send(message)
                if stepped:  # the blocks of the sequences the step ended, once their outputs
                    core.block_manager.settle()  # went out (the stats counted them off already)

    def _send(self, message: EngineCoreOutputs) -> None:
        message.sent_time = self.last_sent = time.monotonic()
        self.outputs.send_multipart([OUTPUTS, self.encode(message)])

    def _note_first_tokens(self, message: EngineCoreOutputs) -> None:
        """Stamp the requests whose first output this step made (server/timeline.py)."""
        launched, sampled = self.core.last_read
        wall_to_monotonic = time.monotonic() - time.time()  # first_scheduled_time is time.time()
        for out in message.outputs:
            received = self.received.pop(out.request_id, None)
            if received is not None:
                scheduled = (math.nan if out.first_scheduled_time is None  # failed unscheduled
                             else out.first_scheduled_time + wall_to_monotonic)
                message.first_token_times.append((out.request_id, received, scheduled, launched,
                                                  sampled))

    def _drain(self, message: EngineCoreOutputs) -> tuple[bool, bool]:
        """Apply every waiting command; (anything received, STOP received)."""
        core, decoders = self.core, self.decoders
        received = False
        while True:
            try:
                kind, payload = self.inputs.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return received, False
            now = time.monotonic()  # per message: one drained later was sent later
            received = True
            if kind == STOP:
                return True, True
            try:
                value = decoders[kind].decode(payload)
            except (KeyError, msgspec.DecodeError) as e:  # one bad command, not the core's end
                self._refuse(kind, payload, e, message)
                continue
            if kind == ADD:
                try:
                    core.add_request(value)
                except Exception as e:  # a request the core cannot run: the API answers 400
                    message.rejected.append((value.request_id, getattr(e, "field", None),
                                             str(e)))
                else:
                    message.accepted.append(value.request_id)
                    self.received[value.request_id] = now
            elif kind == ABORT:
                core.abort_requests(value)
                for request_id in value:
                    self.received.pop(request_id, None)
            elif kind == SNAPSHOT:
                message.snapshots.append((value[0], _snapshot_of(core, value[1], self.busy_s)))
            else:
                core.finish_sequences(value)

    def _refuse(self, kind: bytes, payload: bytes, error: Exception,
                message: EngineCoreOutputs) -> None:
        """A command that does not decode (a value the API process let through that the core's
        types refuse): an ADD whose request id can be read is rejected, as a request the core
        cannot run is; any other is logged and dropped."""
        request_id = None
        if kind == ADD:
            with contextlib.suppress(Exception):
                request_id = msgspec.msgpack.decode(payload).get("request_id")
        why = f"the engine core could not read the request: {_describe(error)}"
        if isinstance(request_id, str):
            message.rejected.append((request_id, None, why))
        else:
            logger.error("dropped a %r command the engine core could not read: %s", kind,
                         _describe(error))


class _Heartbeat:
    """Every HEARTBEAT_S that the loop sent nothing, a HEARTBEAT with its turn count, from a
    thread: a step that runs long (the loop cannot speak) still shows a live process, and the
    unchanged count shows the API process how long the loop has been in it. The thread has a
    socket of its own (ZeroMQ sockets are not shared across threads) to the same address."""

    def __init__(self, ctx: zmq.Context, address: str, loop: _BusyLoop):
        self._socket = ctx.socket(zmq.PUSH)
        self._socket.connect(address)
        self._loop, self._stopped = loop, threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        loop, encode = self._loop, msgspec.msgpack.Encoder().encode
        try:
            while not self._stopped.wait(HEARTBEAT_S):
                if time.monotonic() - loop.last_sent >= HEARTBEAT_S:
                    with contextlib.suppress(zmq.Again):  # never wait: the next one will do
                        self._socket.send_multipart([HEARTBEAT, encode(loop.turns)], zmq.NOBLOCK)
        finally:
            self._socket.close(linger=0)  # closed by its thread, before the context ends

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def _snapshot_of(core: EngineCore, since: int | None, busy_s: float) -> dict:
    start = time.perf_counter()
    try:
        snap = core.snapshot(since)
    except Exception as e:  # a dashboard bug must never stop the engine
        logger.exception("the dashboard snapshot failed")
        return {"error": _describe(e)}
    snap["stats"]["busy_s"] = busy_s
    snap["cost_s"] = time.perf_counter() - start  # the feed slows down if it grows
    return snap


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _pickled(e: Exception) -> bytes:
    """`e` for the API process to raise again; one that does not pickle, or does not unpickle
    (an __init__ taking more than the message, as ParamError's), as a RuntimeError naming its
    type and message."""
    try:
        payload = pickle.dumps(e)
        pickle.loads(payload)  # what the API process will do
        return payload
    except Exception:
        return pickle.dumps(RuntimeError(_describe(e)))


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux), so a killed API process
    never leaves a core holding the GPU; elsewhere the busy loop's parent check does it."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            logger.warning("PR_SET_PDEATHSIG unavailable; relying on the parent check")
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(0)
