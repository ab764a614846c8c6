"""A tensor-parallel worker rank (r >= 1): joins rank 0 (workers.py has the protocol), then runs
the forward of every step rank 0 sends, on its slice of the model, until told to stop.

Started by rank 0 for the ranks on its host, or by hand on another host:

    pagedserve worker --rank 2 --master-addr 10.0.0.1 --master-port 29500 [--gpu 0]

Everything else (model, dtype, engine settings) comes from rank 0; the model path must exist on
this host too. $PAGEDSERVE_TP_SECRET must hold rank 0's secret: every message is signed with it
(workers.Signer), and one from rank 0's address without that signature ends the worker unread.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import pickle
import signal
import socket
import sys
import time
import traceback

import numpy as np
import zmq

from engine.executor.distributed import CommunicatorError, NcclCommunicator, ShmCommunicator
from engine.executor.ops import get_ops
from engine.executor.runner import ModelRunner
from engine.executor.tensor_parallel import (
    TensorParallelOps,
    map_weights,
    release_unused_memory,
    shard_config,
    shard_weights,
)
from engine.executor.transformer import Transformer
from engine.executor.workers import (
    CACHE,
    CONFIG,
    FAILED,
    HELLO,
    IDLE_POLL_MS,
    LOADED,
    MASTER_ADDR_ENV,
    MASTER_PORT_ENV,
    SECRET_ENV,
    STEP,
    STOP,
    Signer,
    WorkerConfig,
    parse_port,
    rendezvous_timeout,
)
from engine.model.loader import load_engine_model


def worker_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pagedserve worker",
                                description="run one tensor-parallel rank (>= 1) of a group "
                                            "whose rank 0 is `pagedserve serve` (or LLM)")
    add_worker_flags(p)
    return run_worker_args(p.parse_args(argv))


def run_worker_args(args: argparse.Namespace) -> int:
    """run_worker with add_worker_flags' values. Ctrl-C reaches every process of the terminal's
    group, the ranks an offline LLM started included (those `serve` starts ignore it): each
    stops quietly with 130, as the commands do."""
    try:
        return run_worker(args.rank, args.master_addr, args.master_port, args.gpu,
                          args.parent_pid, death_signal=not args.no_death_signal)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=_rank, required=True, metavar="R",
                   help="this rank, 1 .. tensor_parallel_size - 1")
    p.add_argument("--master-addr", default=os.environ.get(MASTER_ADDR_ENV), metavar="ADDR",
                   help=f"rank 0's address (default: ${MASTER_ADDR_ENV})")
    # a string default goes through `type` too: a bad $PAGEDSERVE_MASTER_PORT is a usage error
    # of this command, not a traceback of every command's --help
    p.add_argument("--master-port", type=_port, metavar="PORT",
                   default=os.environ.get(MASTER_PORT_ENV) or None,
                   help=f"rank 0's port (default: ${MASTER_PORT_ENV})")
    p.add_argument("--gpu", type=int, default=None, metavar="I",
                   help="the GPU index on this host (default: rank modulo the GPUs visible)")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-death-signal", action="store_true", help=argparse.SUPPRESS)


def _port(text: str) -> int:
    try:
        return parse_port(text, "the port")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _rank(text: str) -> int:
    try:
        rank = int(text)
    except ValueError:
        rank = 0
    if rank < 1:  # rank 0 is `pagedserve serve` itself
        raise argparse.ArgumentTypeError(f"the rank must be an integer >= 1, got {text!r}")
    return rank


def run_worker(rank: int, master_addr: str | None, master_port: int | None,
               gpu: int | None = None, parent_pid: int | None = None,
               death_signal: bool = True) -> int:
    """Exit status: 0 when rank 0 stops the group, 1 on any failure (reported to rank 0 too)."""
    if not master_addr or not master_port:
        print("pagedserve worker: error: --master-addr and --master-port (or "
              f"${MASTER_ADDR_ENV} / ${MASTER_PORT_ENV}) are required", file=sys.stderr)
        return 2
    if not os.environ.get(SECRET_ENV):
        print(f"pagedserve worker: error: ${SECRET_ENV} must hold the secret rank 0 has (the "
              "same on every host: it signs the ranks' messages)", file=sys.stderr)
        return 2
    signer = Signer(os.environ[SECRET_ENV].encode(), rank_0=False)
    if parent_pid is not None:
        _die_with_parent(parent_pid, death_signal)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    # Rank 0 gone: its connection closes. A rank started by hand has no other sign of it (nor
    # a parent that takes it along), and would wait for steps, holding its GPU, forever.
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    sock.connect(f"tcp://{master_addr}:{master_port}")
    say = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid()}
    sock.send_multipart(signer.seal([HELLO, json.dumps(say).encode()]))
    try:
        _Worker(rank, sock, monitor, signer, gpu, parent_pid).run()
        return 0
    except Exception as e:
        message = f"{type(e).__name__}: {e}"
        print(f"pagedserve worker rank {rank}: error: {message}", file=sys.stderr)
        if not isinstance(e, (CommunicatorError, ValueError, FileNotFoundError)):
            traceback.print_exc()  # not a mistake a user can make: the details help
        sock.send_multipart(signer.seal([FAILED, json.dumps({**say, "error": message}).encode()]))
        return 1
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=2000)  # FAILED must get out
        ctx.term()


class _Worker:
    def __init__(self, rank: int, sock, monitor, signer: Signer, gpu: int | None,
                 parent_pid: int | None):
        self.rank, self.sock, self.monitor, self.signer = rank, sock, monitor, signer
        self.gpu, self.parent_pid = gpu, parent_pid

    def check_peers(self) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            raise CommunicatorError("rank 0 is gone")
        if self.monitor.poll(0):
            raise CommunicatorError("the connection to rank 0 closed: rank 0 died or lost the "
                                    "network")

    def _receive(self, kind: bytes, timeout_s: float | None) -> list[bytes]:
        """The next message's frames after its kind, which must be `kind` (STOP: exit)."""
        start = time.monotonic()
        while not self.sock.poll(IDLE_POLL_MS):
            self.check_peers()
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                raise CommunicatorError(f"rank 0 sent nothing for {timeout_s:.0f} s")
        message = self.signer.open(self.sock.recv_multipart())
        if message is None:  # never unpickled: whoever sent it may not run code here
            raise CommunicatorError(f"a message from rank 0's address had no valid signature "
                                    f"(is ${SECRET_ENV} the same as rank 0's?)")
        got, *frames = message
        if got == STOP:
            raise SystemExit(0)
        if got != kind:
            raise CommunicatorError(f"rank 0 sent {got!r} where {kind!r} was due")
        return frames

    def run(self) -> None:
        try:
            self._run()
        except SystemExit:  # STOP
            return

    def _run(self) -> None:
        cfg: WorkerConfig = pickle.loads(self._receive(CONFIG, rendezvous_timeout())[0])
        ec, rank, size = cfg.engine_config, self.rank, cfg.size
        if cfg.device == "cuda":
            import cupy

            cupy.cuda.Device(self.gpu if self.gpu is not None
                             else rank % cupy.cuda.runtime.getDeviceCount()).use()
        ops = get_ops(cfg.device, cfg.dtype, ec.cpu_threads)
        kind, setup, dtype = *cfg.comm, cfg.dtype
        comm = ShmCommunicator(setup, rank, size, self.check_peers) if kind == "shm" else None
        if cfg.weights is not None:
            mc, full = cfg.model_config, map_weights(ops.from_host, cfg.weights)
        else:
            mc, full = _load(ec, ops)
        part = shard_config(mc, size)
        weights = shard_weights(full, mc, rank, size)
        del full, cfg  # the full weights go: only this rank's slice stays
        release_unused_memory(ops)
        self.sock.send_multipart(self.signer.seal([LOADED, json.dumps({"rank": rank}).encode()]))
        # NCCL's init blocks until every rank calls it: after LOADED, so that rank 0 joins only
        # once every rank has loaded (or has reported why it could not).
        if comm is None:
            comm = NcclCommunicator(setup, rank, size, dtype, self.check_peers)
        tp_ops = TensorParallelOps(ops, comm, rank, size, mc.vocab_size)

        num_blocks, max_model_len, eos = pickle.loads(self._receive(CACHE, None)[0])
        kv_cache = ops.alloc_kv_cache(part.num_layers, num_blocks, part.num_kv_heads,
                                      ec.block_size, part.head_dim)
        model = Transformer(part, weights, tp_ops, max_model_len)
        runner = ModelRunner(mc, ec, tp_ops, model, kv_cache, eos_token_ids=eos,
                             max_model_len=max_model_len)
        try:
            while True:
                header, flat = self._receive(STEP, None)
                runner.run_worker_step(pickle.loads(header),
                                       np.frombuffer(flat, np.int32).copy())
        finally:
            runner.close()
            comm.close()
            ops.close()


def _load(ec, ops):
    """(model config, full weights) from engine_config.model, as rank 0 loaded them."""
    loaded = load_engine_model(ec, ops)
    return loaded.config, loaded.weights


def _die_with_parent(parent_pid: int, death_signal: bool = True) -> None:
    """A local worker never outlives rank 0 (Linux: the kernel kills it, unless rank 0 started
    it from a thread other than its main one: that thread's end would kill it)."""
    if death_signal and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(0)
