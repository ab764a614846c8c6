"""Tensor-parallel ranks: rank 0 (the engine core, WorkerGroup) and its worker ranks
(run_worker), over one ZeroMQ socket that rank 0 binds at its master address.

    rank 0: WorkerGroup                           rank r >= 1: run_worker
    shard its own slice of the model
    bind ROUTER tcp://master_addr:master_port
    spawn the local ranks 1..K-1  ------------->  connect a DEALER, send HELLO {rank}
    (ranks K..N-1: `pagedserve worker --rank R`
     on their hosts)
    wait for every HELLO  <----------------------
    CONFIG (engine config, communicator setup) ->  attach the shared memory (cpu); load and
                                                  shard the model; send LOADED (or FAILED)
    wait for every LOADED  <---------------------
    NCCL init (cuda)  <------------------------->  NCCL init (cuda)
    CACHE (KV blocks, max_model_len)  --------->  allocate its KV cache, build its runner (which
    build its runner (captures the decode            captures the decode graphs in step with
    graphs)                                           rank 0's: they hold collectives)
    per step: STEP (WorkerStep, packed inputs) ->  runner.run_worker_step
    STOP  -------------------------------------->  exit 0

The engine core (scheduler, block manager, sampling) stays single on rank 0; workers only run the
forward of the step rank 0 sends them. A worker that dies or fails ends the group: rank 0's next
collective raises CommunicatorError naming the rank (distributed.py checks peers as it waits).
Rank 0 sees a local worker's exit code; of a rank on another host it sees the connection close
(a ZeroMQ socket monitor), so a rank killed while it loads fails the start at once, not after
LOAD_TIMEOUT_S. Local workers die with rank 0 (PR_SET_PDEATHSIG); a worker started by hand ends
when its connection to rank 0 closes.

Rank 0's address: EngineConfig.master_addr / master_port, else PAGEDSERVE_MASTER_ADDR /
PAGEDSERVE_MASTER_PORT, else 127.0.0.1 and a free port (all ranks local).

Every message carries an HMAC-SHA256 of its frames under the group's secret (Signer), and one
without a valid tag is refused: the channel is plain TCP and a worker unpickles what rank 0
sends, so without it whoever listened at the master address, or connected to it, could run code
in a rank or claim one. The secret is $PAGEDSERVE_TP_SECRET, the same on every host; where all
ranks are local and it is unset, rank 0 makes a random one and hands it to its workers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import pickle
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from engine.executor.distributed import CommunicatorError, NcclCommunicator, ShmCommunicator
from engine.executor.step_inputs import StepInputs, WorkerStep
from engine.executor.tensor_parallel import (
    TensorParallelOps,
    check_tensor_parallel,
    map_weights,
    shard_config,
    shard_weights,
)
from engine.model.config import ConfigError, EngineConfig, ModelConfig
from engine.model.weights import ModelWeights

HELLO, CONFIG, LOADED, FAILED, CACHE, STEP, STOP = b"H", b"C", b"L", b"E", b"K", b"S", b"Q"
MASTER_ADDR_ENV, MASTER_PORT_ENV = "PAGEDSERVE_MASTER_ADDR", "PAGEDSERVE_MASTER_PORT"
SECRET_ENV = "PAGEDSERVE_TP_SECRET"
logger = logging.getLogger("pagedserve." + __name__)
# How long rank 0 waits for every rank to say HELLO (and a worker for CONFIG); loading is bounded
# by LOAD_TIMEOUT_S: this, when set (tests), else $PAGEDSERVE_RENDEZVOUS_TIMEOUT
# (rendezvous_timeout).
RENDEZVOUS_TIMEOUT_S: float | None = None
RENDEZVOUS_TIMEOUT_ENV = "PAGEDSERVE_RENDEZVOUS_TIMEOUT"
LOAD_TIMEOUT_S = 3600.0
IDLE_POLL_MS = 500  # how often an idle worker checks that rank 0 lives


class Signer:
    """The HMAC-SHA256 tag of a message's frames (rank 0's routing identity excluded) under the
    group's secret, sent as the message's last frame. The tag covers the direction too, so that
    a message of rank 0's sent back to it (or a worker's to a worker) does not pass."""

    def __init__(self, secret: bytes, rank_0: bool):
        self.secret = secret
        self.sends, self.receives = (b"rank 0", b"worker") if rank_0 else (b"worker", b"rank 0")

    def seal(self, frames: list) -> list:
        return [*frames, self._tag(self.sends, frames)]

    def open(self, frames: list) -> list | None:
        """The frames before the tag, or None when the tag is missing or wrong."""
        if len(frames) < 2:
            return None
        *body, tag = frames
        return body if hmac.compare_digest(bytes(tag), self._tag(self.receives, body)) else None

    def _tag(self, sender: bytes, frames: list) -> bytes:
        mac = hmac.new(self.secret, sender, digestmod=hashlib.sha256)
        for frame in frames:
            view = memoryview(frame).cast("B")
            mac.update(len(view).to_bytes(8, "little"))
            mac.update(view)
        return mac.digest()


def group_secret(num_local: int, size: int) -> bytes:
    """$PAGEDSERVE_TP_SECRET, else a random secret when every rank is local (rank 0 gives it to
    the workers it starts); ranks on other hosts cannot learn that, so they need the variable."""
    text = os.environ.get(SECRET_ENV)
    if text:
        return text.encode()
    if num_local < size:
        raise ConfigError(f"tensor-parallel ranks on other hosts (tp_local_ranks {num_local} < "
                          f"tensor_parallel_size {size}) need ${SECRET_ENV}: the same secret "
                          f"on every host, which signs the ranks' messages")
    return secrets.token_hex(32).encode()


def master_address(config: EngineConfig) -> tuple[str, int]:
    """Rank 0's address. Under data parallel every core is a rank 0 of its own group: core i
    listens on the given port + i (its hand-started ranks connect there), so that the cores do
    not all bind one port."""
    addr = config.master_addr or os.environ.get(MASTER_ADDR_ENV) or "127.0.0.1"
    port = config.master_port
    if port is None:
        port = parse_port(os.environ.get(MASTER_PORT_ENV) or "0", f"${MASTER_PORT_ENV}",
                          allow_zero=True)
    if port and config.data_parallel_rank:
        port += config.data_parallel_rank
        if port > 65535:
            raise ConfigError(f"data-parallel core {config.data_parallel_rank} listens on the "
                              f"master port + {config.data_parallel_rank} = {port}, beyond 65535")
    return addr, port


def rendezvous_timeout() -> float:
    """Seconds a rendezvous waits: RENDEZVOUS_TIMEOUT_S, else $PAGEDSERVE_RENDEZVOUS_TIMEOUT
    (300), read when a rendezvous starts, so a bad value fails a tensor-parallel start naming
    the variable and nothing else."""
    if RENDEZVOUS_TIMEOUT_S is not None:
        return RENDEZVOUS_TIMEOUT_S
    text = os.environ.get(RENDEZVOUS_TIMEOUT_ENV) or "300"
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"${RENDEZVOUS_TIMEOUT_ENV} must be a number of seconds > 0, got "
                         f"{text!r}")
    return seconds


def parse_port(text: str, name: str, allow_zero: bool = False) -> int:
    """A TCP port number (0: any free one, where allowed), else a ValueError naming `name`."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"{name} must be a TCP port number (1..65535), got {text!r}")
    return port


@dataclass
class WorkerConfig:
    """CONFIG: everything a worker needs besides its rank."""

    engine_config: EngineConfig
    device: str  # resolved: numpy | cuda
    dtype: str  # resolved
    size: int
    comm: tuple  # ("shm", segment name) or ("nccl", unique id)
    model_config: ModelConfig | None = None  # with weights: the model rank 0 was handed
    weights: ModelWeights | None = None  # host arrays (tests' tiny models); None: load it


class WorkerGroup:
    """Rank 0's side of the group: starts it (constructor), sends each step, stops it.

    After the constructor: `ops` (the backend with collectives), `config` (one rank's shape)
    and `weights` (rank 0's slice)."""

    def __init__(self, engine_config: EngineConfig, device: str, dtype: str, ops, loaded,
                 send_weights: bool):
        """`loaded`: rank 0's full model (.config, .weights); `send_weights`: hand the weights to
        the workers (a model given in memory) instead of having each load engine_config.model."""
        size = engine_config.tensor_parallel_size
        num_local = engine_config.tp_local_ranks or size
        mc = loaded.config
        first_gpu = 0  # local rank r runs on GPU first_gpu + r, rank 0 on the current one
        if device == "cuda":
            import cupy

            num_gpus = cupy.cuda.runtime.getDeviceCount()
            first_gpu = cupy.cuda.Device().id
            if first_gpu + num_local > num_gpus:
                raise ConfigError(f"tensor_parallel_size ({size}) needs {num_local} GPUs on this "
                                  f"host from GPU {first_gpu} on, and CuPy sees {num_gpus}")
        check_tensor_parallel(mc, size)
        # Rank 0's slice first: weights that cannot be split (quantized) are refused before
        # any rank starts (and loads the whole model for nothing).
        self.config = shard_config(mc, size)
        self.weights = shard_weights(loaded.weights, mc, 0, size)
        addr, port = master_address(engine_config)
        join_timeout = rendezvous_timeout()  # checked before any process starts
        if num_local < size and not port:
            raise ConfigError(f"tp_local_ranks ({num_local}) < tensor_parallel_size ({size}): "
                              f"the ranks on other hosts need a known master_port (or "
                              f"${MASTER_PORT_ENV}) to join")
        secret = group_secret(num_local, size)
        self.signer = Signer(secret, rank_0=True)
        self.size, self.procs, self.identities = size, {}, {}
        self.comm = None
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            if port:
                self._sock.bind(f"tcp://{addr}:{port}")
            else:
                port = self._sock.bind_to_random_port(f"tcp://{addr}")
            self.address = f"{addr}:{port}"
            for rank in range(1, num_local):
                self.procs[rank] = _spawn_worker(rank, first_gpu + rank, addr, port, secret)
            self._wait_for(HELLO, join_timeout, "join")
            if device == "cuda":
                setup = ("nccl", NcclCommunicator.new_unique_id())
            else:
                self.comm = ShmCommunicator(None, 0, size, self.check_peers)
                setup = ("shm", self.comm.name)
            config = WorkerConfig(engine_config, device, dtype, size, setup)
            if send_weights:
                config.model_config = mc
                config.weights = map_weights(ops.to_host, loaded.weights)
            self._send_all(CONFIG, pickle.dumps(config))
            self._wait_for(LOADED, LOAD_TIMEOUT_S, "load the model")
            if device == "cuda":  # returns once every rank has joined (right after LOADED)
                self.comm = NcclCommunicator(setup[1], 0, size, dtype, self.check_peers)
            self.comm.unlink()  # every rank has attached
        except BaseException:
            self.close()
            raise
        self.ops = TensorParallelOps(ops, self.comm, 0, size, mc.vocab_size)

    # ---------------------------------------------------------------- start-up

    def _send_all(self, kind: bytes, payload: bytes) -> None:
        sealed = self.signer.seal([kind, payload])
        for identity in self.identities.values():
            self._sock.send_multipart([identity, *sealed])

    def _receive(self) -> tuple[bytes, bytes, dict] | None:
        """(identity, kind, JSON payload) of the next message, or None when its tag is not the
        group's (logged and dropped: a stranger at the master address claims no rank)."""
        identity, *frames = self._sock.recv_multipart()
        body = self.signer.open(frames)
        if body is not None and len(body) == 2:
            try:  # a worker's JSON; a replayed message of rank 0's own (STOP, CONFIG) is not
                return identity, body[0], json.loads(body[1])
            except ValueError:
                pass
        logger.warning("tensor parallel: a message at %s without the group's signature was "
                       "dropped (is $%s the same on every host?)", self.address, SECRET_ENV)
        return None

    def _wait_for(self, kind: bytes, timeout_s: float, what: str) -> None:
        """Until every rank 1..N-1 has sent `kind`; CommunicatorError if one fails, dies or
        stays silent for timeout_s."""
        waiting = set(range(1, self.size))
        deadline = time.monotonic() + timeout_s
        while waiting:
            self._check_local()
            if not self._sock.poll(100):
                self._check_connections()
                if time.monotonic() > deadline:
                    raise CommunicatorError(
                        f"tensor-parallel rank(s) {sorted(waiting)} did not {what} within "
                        f"{timeout_s:.0f} s (rank 0 listens on {self.address}; start a rank on "
                        f"another host with `pagedserve worker --rank R --master-addr ADDR "
                        f"--master-port PORT`)")
                continue
            message = self._receive()
            if message is None:
                continue
            identity, got, info = message
            rank = info.get("rank")
            if got == FAILED:
                raise CommunicatorError(f"tensor-parallel rank {rank} failed: {info['error']}")
            if got == HELLO == kind and rank not in waiting:
                raise CommunicatorError(
                    f"tensor-parallel rank {rank!r} joined rank 0 at {self.address} "
                    + (f"twice (two workers started with --rank {rank}?)"
                       if rank in range(1, self.size) else
                       f"but tensor_parallel_size is {self.size}: the ranks that join are "
                       f"1..{self.size - 1}"))
            if got != kind or rank not in waiting:
                raise CommunicatorError(f"tensor-parallel rank {rank!r} sent {got!r} out of turn "
                                        f"(is another group using {self.address}?)")
            if kind == HELLO:
                self.identities[rank] = identity
            waiting.discard(rank)

    def start_runners(self, num_blocks: int, max_model_len: int, eos_token_ids: list[int]):
        """Each worker allocates its KV cache and builds its runner; call just before rank 0
        builds its own (their graph captures run collectives together)."""
        self._send_all(CACHE, pickle.dumps((num_blocks, max_model_len, eos_token_ids)))

    # ---------------------------------------------------------------- steps

    def send_step(self, inputs: StepInputs, block_copies: list, use_graph: bool,
                  has_prev: bool, num_rows: int) -> None:
        flat, where = inputs.pack()
        m = inputs.meta
        step = WorkerStep({name: (s.start, s.stop) for name, s in where.items()},
                          tuple(m.block_tables.shape), int(m.max_query_len),
                          int(m.max_context_len), list(block_copies), use_graph, has_prev,
                          num_rows)
        sealed = self.signer.seal([STEP, pickle.dumps(step), flat])
        for identity in self.identities.values():
            self._sock.send_multipart([identity, *sealed])

    def check_peers(self) -> None:
        """CommunicatorError if a worker died or reported a failure (the collectives' check)."""
        self._check_local()
        while self._sock.poll(0):
            message = self._receive()
            if message is not None and message[1] == FAILED:
                info = message[2]
                raise CommunicatorError(f"tensor-parallel rank {info.get('rank')} failed: "
                                        f"{info['error']}")
        self._check_connections()

    def _check_connections(self) -> None:
        """CommunicatorError if a rank's connection closed (call when its messages are read: a
        rank that fails says FAILED before it goes). A local worker's exit says more: it is
        waited for briefly, as its socket closes a moment before the exit shows."""
        if not self._monitor.poll(0):
            return
        recv_monitor_message(self._monitor)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            self._check_local()
            time.sleep(0.01)
        raise CommunicatorError(f"a tensor-parallel rank's connection to rank 0 "
                                f"({self.address}) closed: that rank died or lost the network; "
                                f"its log says why")

    def _check_local(self) -> None:
        for rank, proc in self.procs.items():
            if proc.poll() is not None:
                raise CommunicatorError(f"tensor-parallel worker rank {rank} (pid {proc.pid}) "
                                        f"{describe_exit(proc.returncode)}")

    @property
    def worker_pids(self) -> dict[int, int]:
        """The local workers' process ids, by rank."""
        return {rank: proc.pid for rank, proc in self.procs.items()}

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop every worker (the local ones are killed if they do not exit in time)."""
        if self._sock is None:
            return
        for identity in self.identities.values():
            self._sock.send_multipart([identity, *self.signer.seal([STOP, b""])], zmq.NOBLOCK)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.comm is not None:
            self.comm.unlink()
            self.comm.close()
            self.comm = None
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        self._ctx.term()
        self._sock = None


def _spawn_worker(rank: int, gpu: int, addr: str, port: int, secret: bytes) -> subprocess.Popen:
    """A local rank: this Python, this environment (NCCL_* included, untouched), and the
    group's secret. It imports the `engine` this process runs, and finds other modules as this
    process does (multiprocessing's spawn hands its children sys.path too): `python -c` alone
    would put the working directory first, where a package of the same generic name (a user's
    own `engine/`, another checkout) would stand in for ours."""
    path = [str(Path(__file__).resolve().parents[2]), *sys.path]  # [2]: the folder above engine/
    code = (f"import sys; sys.path[:] = {path!r}; "
            "from engine.executor.worker import worker_main; sys.exit(worker_main())")
    args = [sys.executable, "-c", code, "--rank", str(rank), "--master-addr", addr,
            "--master-port", str(port), "--gpu", str(gpu), "--parent-pid", str(os.getpid())]
    if threading.current_thread() is not threading.main_thread():
        # PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process:
        # a group started from a thread that then exits (an LLM built in a thread pool) would
        # lose its workers. Those rely on the parent check (worker.py) instead.
        args.append("--no-death-signal")
    return subprocess.Popen(args, env={**os.environ, SECRET_ENV: secret.decode()})


def describe_exit(code: int | None) -> str:
    """How a child process ended, from its exit code (negative: the signal that killed it)."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
