"""Clients of the engine core: the same commands whether the core runs here or in its own process.

    EngineCoreClient  the core in this process; get_output() runs one step (LLMEngine, LLM)
    MPClient          the core in a spawned process (engine/core_process.py) over ZeroMQ;
                      await get_output_async() gives each message as it arrives (the server)

Both take add_request / abort_requests / finish_sequences / shutdown. In-process, add_request
raises a rejection at once; across processes it comes back in EngineCoreOutputs.rejected.
MPClient also watches its core: one that dies, or hangs (engine/core/liveness.py), is reported
as a fatal message on its output stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from engine.core.liveness import CHECK_EVERY_S, DEFAULT_LIVENESS, Liveness, Watchdog
from engine.core.outputs import EngineCoreOutputs, EngineCoreRequest
from engine.core_process import (
    ABORT,
    ADD,
    FAILED,
    FINISH,
    HEARTBEAT,
    OUTPUTS,
    SNAPSHOT,
    STOP,
    CoreReady,
    run_core_process,
)
from engine.engine_core import EngineCore
from engine.executor.workers import describe_exit
from engine.model.config import EngineConfig

logger = logging.getLogger("pagedserve.core_client")

# After the core process exits, how long its last message may still be on its way (its own
# account of its death comes before the API's).
LAST_MESSAGE_GRACE_S = 0.2


class CoreDied(RuntimeError):
    """The engine core is gone; the message says why (its error, or how the process ended)."""


class EngineCoreClient:
    def __init__(self, core: EngineCore):
        self.core = core

    def add_request(self, req: EngineCoreRequest) -> None:
        self.core.add_request(req)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.core.abort_requests(request_ids)

    def finish_sequences(self, items: list[tuple[str, int, str]]) -> None:
        self.core.finish_sequences(items)

    def get_output(self) -> EngineCoreOutputs:
        """Run one step."""
        return EngineCoreOutputs(self.core.step())

    def shutdown(self) -> None:
        self.core.shutdown()


class MPClient:
    """The core in a child process.

    start() spawns it and wait_ready() waits for its model to load (both without an event loop,
    so the CLI loads before it serves); attach() then joins the running event loop, where
    get_output_async() reads the core's messages. Call start() from a thread that lives as long
    as the client: on Linux the child dies with the thread that started it.
    """

    def __init__(self, engine_config: EngineConfig, make_core=None, cuda_devices: str | None = None,
                 name: str = "pagedserve-core", liveness: Liveness = DEFAULT_LIVENESS):
        """`cuda_devices`: the core's CUDA_VISIBLE_DEVICES (None: this process's); `name`: the
        process's name (data parallel numbers its cores); `liveness`: when a core that hangs is
        failed, once attached."""
        self.config, self.make_core = engine_config, make_core
        self.cuda_devices, self.name = cuda_devices, name
        self.process = None
        self._dir = self._ctx = None  # the socket folder and ZeroMQ context, from start()
        self._inputs = self._outputs = self._async_outputs = self._obituary = None
        self._closing = False
        # The process's sentinel the event loop watches (attach() until the exit or detach()),
        # and that loop: kept here, as shutdown() (on another thread) clears `process`.
        self._sentinel = self._loop = None
        self.ready = False  # wait_ready saw the core loaded: it reads its messages from then on
        self._stop_asked = False
        self.watchdog = Watchdog(liveness)
        self._watching = False  # from attach() until detach(): someone reads the core's messages
        self._fatal_sent = False  # the watchdog failed the core: its death is no news
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode_outputs = msgspec.msgpack.Decoder(EngineCoreOutputs).decode

    def start(self) -> None:
        """Bind the sockets and spawn the core."""
        # The sockets live in a folder only this user can enter (an abstract-namespace socket
        # would leave no file, but any local user could connect to it). close() removes the
        # folder; one left by a killed server goes at the next start (remove_stale_socket_dirs).
        remove_stale_socket_dirs()
        self._dir = tempfile.mkdtemp(prefix=f"{SOCKET_DIR_PREFIX}{os.getpid()}-")
        try:
            input_address = f"ipc://{self._dir}/input"
            self._output_address = f"ipc://{self._dir}/output"
            self._ctx = zmq.Context()
            self._inputs = self._ctx.socket(zmq.PUSH)
            self._inputs.setsockopt(zmq.SNDHWM, 0)  # never block the event loop on a send
            self._inputs.bind(input_address)
            self._outputs = self._ctx.socket(zmq.PULL)
            self._outputs.setsockopt(zmq.RCVHWM, 0)
            self._outputs.bind(self._output_address)
            level = logging.getLevelName(logging.getLogger("pagedserve").getEffectiveLevel())
            # spawn, not fork: CUDA must start fresh in the child, and nothing of this process
            # (event loop, threads, sockets) is copied into it.
            spawn = multiprocessing.get_context("spawn")
            self.process = spawn.Process(
                target=run_core_process, name=self.name, daemon=True,
                args=(self.config, input_address, self._output_address, os.getpid(),
                      self.make_core, str(level).lower(), self.cuda_devices))
            self.process.start()
        except BaseException:  # Ctrl-C or a supervisor's SIGTERM while spawning: leave nothing
            self.shutdown()
            raise

    def wait_ready(self) -> CoreReady:
        """Block until the core has loaded; raise what loading raised in the core, or CoreDied.
        Runs on any one thread; the event loop's sockets come after, in attach()."""
        while (ready := self.poll_ready(100)) is None:
            pass
        return ready

    def poll_ready(self, timeout_ms: int) -> CoreReady | None:
        """One wait_ready look of up to timeout_ms: the core's CoreReady, or None while it
        loads; raises as wait_ready."""
        if not self._outputs.poll(timeout_ms):
            if not self.process.is_alive():
                raise CoreDied(f"the engine core process "
                               f"{describe_exit(self.process.exitcode)} while loading")
            return None
        kind, payload = self._outputs.recv_multipart()
        if kind == HEARTBEAT:  # (its heartbeat starts once it is ready)
            return None
        if kind == FAILED:
            try:
                error = pickle.loads(payload)
            except Exception as e:  # the core checks it unpickles; never a TypeError of __init__
                raise RuntimeError(f"loading the engine core failed, and its error could not be "
                                   f"read back: {type(e).__name__}: {e}") from None
            raise error
        self.ready = True
        return msgspec.msgpack.decode(payload, type=CoreReady)

    def attach(self, busy: Callable[[], bool] = lambda: False) -> None:
        """Read the core's messages on the running event loop, and watch the process there:
        its death, and its liveness (`busy()`: requests are in flight)."""
        loop = asyncio.get_running_loop()
        self._async_outputs = zmq.asyncio.Socket.shadow(self._outputs.underlying)
        self._outputs_fd = self._outputs.FD
        # The API's own voice on the output stream: it reports the core's death in line with
        # the messages the core sent before it died.
        self._obituary = self._ctx.socket(zmq.PUSH)
        self._obituary.connect(self._output_address)
        self._sentinel, self._loop = self.process.sentinel, loop
        loop.add_reader(self._sentinel, self._on_process_exit, loop)
        if not self.process.is_alive():  # died before the reader was there to see it
            self._on_process_exit(loop)
        self._busy, self._watching = busy, True
        self.watchdog.start()
        loop.call_later(CHECK_EVERY_S, self._watch, loop)

    def detach(self) -> None:
        """Its messages are no longer read (the reader ended): stop judging the core, whose
        heartbeats now wait unread and would pass for its silence; nor is its exit watched."""
        self._watching = False
        self._stop_watching_exit()

    async def get_output_async(self) -> EngineCoreOutputs:
        """The next message; when the core has died, one whose `fatal` says why."""
        # A non-blocking read, and the socket's descriptor watched only when it finds nothing
        # (ZeroMQ signals it after a read came back empty): through zmq.asyncio's futures and
        # event flags a message cost the API's loop as much as handling the step it carries.
        while (message := self.get_output_nowait()) is None:
            loop = asyncio.get_running_loop()
            readable = loop.create_future()
            loop.add_reader(self._outputs_fd, _wake, readable)
            try:
                await readable
            finally:
                loop.remove_reader(self._outputs_fd)
        return message

    @property
    def output_socket(self) -> zmq.asyncio.Socket:
        """The socket get_output_async reads (after attach()), for a poller over several cores."""
        return self._async_outputs

    def get_output_nowait(self) -> EngineCoreOutputs | None:
        """The next message if one has arrived, else None (heartbeats go to the watchdog)."""
        while True:
            try:
                kind, payload = self._outputs.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return None
            if kind != HEARTBEAT:
                self.watchdog.heard()
                return self._decode_outputs(payload)
            self.watchdog.heard(msgspec.msgpack.decode(payload, type=int))

    def add_request(self, req: EngineCoreRequest) -> None:
        self._send(ADD, self._encode(req))

    def abort_requests(self, request_ids: list[str]) -> None:
        self._send(ABORT, self._encode(request_ids))

    def finish_sequences(self, items: list[tuple[str, int, str]]) -> None:
        self._send(FINISH, self._encode(items))

    def request_snapshot(self, ticket: int, since: int | None) -> None:
        """The core answers in EngineCoreOutputs.snapshots, under `ticket`."""
        self._send(SNAPSHOT, self._encode((ticket, since)))

    def _send(self, kind: bytes, payload: bytes) -> None:
        # A PUSH socket blocks while no peer is connected, i.e. once the core is gone: then the
        # command is moot, and the core's death reaches the caller through get_output_async().
        try:
            self._inputs.send_multipart([kind, payload], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            logger.warning("the engine core is not connected; a command was dropped")

    def _stop_watching_exit(self) -> None:
        """Remove the sentinel's reader (on the loop's thread); once only."""
        if self._sentinel is not None:
            self._loop.remove_reader(self._sentinel)
            self._sentinel = None

    def _on_process_exit(self, loop: asyncio.AbstractEventLoop) -> None:
        # Not self.process: shutdown() may have cleared it, on its thread, before this ran.
        self._stop_watching_exit()
        if not self._closing and self._obituary is not None:
            loop.call_later(LAST_MESSAGE_GRACE_S, self._report_death)

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._closing or self._fatal_sent or not self._watching:
            return
        cause = self.watchdog.verdict(self._busy())
        if cause is None:
            loop.call_later(CHECK_EVERY_S, self._watch, loop)
            return
        process = self.process  # (None once shutdown(), on another thread, is through)
        if process is None or not process.is_alive():  # dead, not hung: _report_death says how
            return
        # Failed as if it had died: the requests in flight fail naming the cause, and the core
        # goes at once (SIGKILL works on a stopped process too) rather than hold its GPU.
        logger.error("%s; killing it", cause)
        self._fatal_sent = True
        self._obituary.send_multipart([OUTPUTS, self._encode(EngineCoreOutputs(fatal=cause))])
        process.kill()

    def _report_death(self) -> None:
        # Shut down meanwhile (nobody is left to tell), or failed by the watchdog (told).
        process = self.process
        if self._closing or self._fatal_sent or process is None:
            return
        # The sentinel fires as the process closes its files, a moment before it can be reaped.
        process.join(1.0)
        cause = describe_exit(process.exitcode)
        logger.error("the engine core process %s", cause)
        message = self._encode(EngineCoreOutputs(fatal=f"the engine core process {cause}"))
        self._obituary.send_multipart([OUTPUTS, message])

    def ask_to_stop(self) -> None:
        """Send the core STOP; a core still loading reads no message (and has no request to
        finish) until it is ready: it is killed instead, not waited for (once)."""
        process = self.process
        if self._stop_asked or process is None or not process.is_alive():
            return
        self._stop_asked = True
        if not self.ready:
            process.kill()
            return
        with contextlib.suppress(zmq.Again):  # not connected: it is exiting already
            self._inputs.send_multipart([STOP, b""], zmq.NOBLOCK)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the core (it frees the GPU as it exits) and remove the sockets: whatever of
        them start() made, also when it was interrupted; a second call does nothing."""
        self._closing = True
        self.ask_to_stop()
        process = self.process
        if process is not None and process.is_alive():  # (False where it never started)
            process.join(timeout)
            if process.is_alive():
                logger.warning("the engine core did not stop in %.0f s; killing it", timeout)
                process.kill()
                process.join()
        for sock in (self._inputs, self._outputs, self._obituary):
            if sock is not None:
                sock.close(linger=0)  # a socket closed before: nothing
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.process = None


SOCKET_DIR_PREFIX = "pagedserve-"  # + the API process's pid + "-" + mkdtemp's letters


def remove_stale_socket_dirs() -> None:
    """Remove the socket folders of API processes of this user that are gone (killed: SIGKILL
    leaves no chance to clean up); a folder whose process lives, or another user's, stays."""
    if not hasattr(os, "getuid"):  # Windows: no owner to check, and os.kill(pid, 0) kills
        return
    root = Path(tempfile.gettempdir())
    for folder in root.glob(f"{SOCKET_DIR_PREFIX}*-*"):
        pid = folder.name[len(SOCKET_DIR_PREFIX):].split("-", 1)[0]
        with contextlib.suppress(OSError, OverflowError):
            st = folder.lstat()  # a symlink (anyone's, to anywhere) is never followed
            if (not pid.isdigit() or not stat.S_ISDIR(st.st_mode)
                    or st.st_uid != os.getuid()):
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(folder, ignore_errors=True)


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
