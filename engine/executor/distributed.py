"""Communicators: the collectives tensor-parallel ranks run inside each forward pass.

Every rank calls the same collectives in the same order (the transformer's, then the sampled-ids
broadcast); a collective returns once every rank has joined it.

    all_reduce(x)   the elementwise sum over ranks, on every rank (identical bits everywhere)
    gather(x)       rank 0: the ranks' (R, n) pieces side by side, (R, size * n); others: None
    broadcast(x)    rank 0's x, written into x on the other ranks; returns x
    barrier()
    wait(event)     until the device has passed `event` (collectives queued on a stream may
                    never finish if a peer died: this wait watches the peers)

Two backends behind that interface:
- ShmCommunicator (the numpy backend, one host): processes exchanging numpy arrays through one
  multiprocessing.shared_memory segment. Sums run in float32 in rank order on every rank, so
  all ranks hold the same residual stream and TP=N logits match TP=1 within float rounding.
- NcclCommunicator (the cuda backend, one or several hosts): cupy.cuda.nccl on the current
  stream, so the decode CUDA graphs capture the collectives with the rest of the forward. NCCL
  reads its NCCL_* environment as the user set it; nothing here sets or overrides one.

A wait that outlives a peer fails: CommunicatorError, after `check_peers()` (which raises when it
knows a peer died) or `timeout_s` without progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from multiprocessing import resource_tracker, shared_memory

import numpy as np

# How long a collective waits for the slowest rank before it calls the group dead: a rank only
# lags by one layer's compute, so a minute means a peer is gone (or stuck for good).
COLLECTIVE_TIMEOUT_S = 60.0
# How often a waiting rank asks check_peers() whether someone died.
PEER_CHECK_S = 0.1
# Segments this process created: it owns their unlinking (tests run ranks as threads).
_CREATED: set[str] = set()


class CommunicatorError(RuntimeError):
    """A collective cannot complete: a rank died or stopped answering. The group is unusable."""


# ----------------------------------------------------------------------------- shared memory


class ShmCommunicator:
    """Collectives over one shared-memory segment (numpy arrays, ranks on one host).

    Layout: `size` int64 counters (the last collective each rank published), then two sets
    (alternating by collective parity) of `size` slots of `slot_bytes`. A collective writes the
    rank's piece into its slot, publishes the collective's number, waits until every counter
    reaches it, then reads every slot. Two slot sets are enough: a rank writes collective g's
    slot only after every rank published g - 1, i.e. finished reading g - 2 from that set.
    Pieces larger than a slot go through in chunks, one exchange each.

    NOTE: the counters are plain int64 stores; x86 keeps stores (and loads) in program order, so
    a counter is never seen before the data it publishes. On a weakly ordered CPU this would need
    fences.
    """

    SLOT_BYTES = 4 << 20

    def __init__(self, name: str | None, rank: int, size: int,
                 check_peers: Callable[[], None] | None = None,
                 timeout_s: float = COLLECTIVE_TIMEOUT_S, slot_bytes: int = SLOT_BYTES):
        """name None: create the segment (rank 0; its name is `.name`); else attach to it."""
        self.rank, self.size = rank, size
        self.check_peers = check_peers or (lambda: None)
        self.timeout_s = timeout_s
        self.slot_bytes = slot_bytes
        header = 8 * size
        total = header + 2 * size * slot_bytes
        if name is None:
            self._shm = shared_memory.SharedMemory(create=True, size=total)
            _CREATED.add(self._shm.name)
        else:
            try:
                self._shm = shared_memory.SharedMemory(name=name)
            except FileNotFoundError:
                # Not a model file missing, which is what the bare error reads like.
                raise CommunicatorError(
                    f"rank 0's shared-memory segment {name!r} is not on this host: on the cpu "
                    f"backend every tensor-parallel rank runs on rank 0's host (the ranks "
                    f"exchange arrays through its shared memory)") from None
            if name not in _CREATED:
                # The creator owns (and unlinks) the segment; without this, this process's
                # resource tracker would unlink it too at exit, and warn about a "leak".
                resource_tracker.unregister(self._shm._name, "shared_memory")
        self.name = self._shm.name
        buf = self._shm.buf
        self._counters = np.ndarray((size,), np.int64, buf, 0)  # (size,)
        if name is None:
            self._counters[:] = 0
        self._slots = np.ndarray((2, size, slot_bytes), np.uint8, buf, header)
        self._generation = 0

    def unlink(self) -> None:
        """Remove the segment's name once every rank has attached: the mappings live on, and a
        killed group leaves nothing behind in /dev/shm. Idempotent."""
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self._counters = self._slots = None
        self._shm.close()

    # ---------------------------------------------------------------- the one exchange

    def _exchange(self, piece: np.ndarray | None, nbytes: int) -> list[np.ndarray]:
        """Publish `piece` (1-D, at most slot_bytes; None: nothing to say) and return every rank's
        first `nbytes` bytes, valid until the next exchange."""
        self._generation += 1
        g = self._generation
        slots = self._slots[g % 2]
        if piece is not None:
            slots[self.rank, : piece.nbytes] = piece.view(np.uint8)
        self._counters[self.rank] = g
        self._wait(g)
        return [slots[r, :nbytes] for r in range(self.size)]

    def _wait(self, g: int) -> None:
        counters = self._counters
        if counters.min() >= g:
            return
        start = last_check = time.perf_counter()
        spins = 0
        while counters.min() < g:
            spins += 1
            if spins > 200:  # a short spin catches a peer that is nearly there; then yield
                time.sleep(20e-6)
            now = time.perf_counter()
            if now - last_check > PEER_CHECK_S:
                last_check = now
                self.check_peers()
                if now - start > self.timeout_s:
                    late = [r for r in range(self.size) if counters[r] < g]
                    raise CommunicatorError(f"tensor-parallel rank(s) {late} did not join a "
                                            f"collective within {self.timeout_s:g} s")

    def _chunks(self, flat: np.ndarray):
        step = self.slot_bytes // flat.itemsize
        for start in range(0, max(len(flat), 1), step):
            yield start, min(start + step, len(flat))

    # ---------------------------------------------------------------- collectives

    def all_reduce(self, x: np.ndarray) -> np.ndarray:
        """The float32 sum over ranks, added in rank order (so every rank gets the same bits)."""
        flat = np.ascontiguousarray(x, np.float32).reshape(-1)
        out = np.empty_like(flat)
        for a, b in self._chunks(flat):
            parts = self._exchange(flat[a:b], (b - a) * 4)
            acc = parts[0].view(np.float32).copy()
            for p in parts[1:]:
                acc += p.view(np.float32)
            out[a:b] = acc
        return out.reshape(x.shape)

    def gather(self, x: np.ndarray) -> np.ndarray | None:
        """x (R, n) on every rank -> rank 0: (R, size * n), rank r's piece in columns
        r*n:(r+1)*n; other ranks: None."""
        rows, n = x.shape
        flat = np.ascontiguousarray(x).reshape(-1)
        out = np.empty((self.size, flat.size), flat.dtype) if self.rank == 0 else None
        for a, b in self._chunks(flat):
            parts = self._exchange(flat[a:b], (b - a) * flat.itemsize)
            if out is not None:
                for r, p in enumerate(parts):
                    out[r, a:b] = p.view(flat.dtype)
        if out is None:
            return None
        return out.reshape(self.size, rows, n).transpose(1, 0, 2).reshape(rows, self.size * n)

    def broadcast(self, x: np.ndarray) -> np.ndarray:
        """Rank 0's x into x (contiguous) on every other rank; returns x."""
        flat = x.reshape(-1)
        for a, b in self._chunks(flat):
            mine = flat[a:b] if self.rank == 0 else None
            parts = self._exchange(mine, (b - a) * flat.itemsize)
            if self.rank:
                flat[a:b] = parts[0].view(flat.dtype)
        return x

    def barrier(self) -> None:
        self._exchange(None, 0)

    def wait(self, event) -> None:
        """Nothing is queued: every collective has completed when it returns."""


# ----------------------------------------------------------------------------- NCCL


class NcclCommunicator:
    """Collectives over NCCL (cupy.cuda.nccl) on the current CUDA stream: they queue like any
    kernel, so a CUDA graph captured around a forward replays them too. Activations go over the
    wire in the compute dtype (bf16 / fp16), logits in fp32."""

    def __init__(self, unique_id, rank: int, size: int, dtype: str,
                 check_peers: Callable[[], None] | None = None,
                 timeout_s: float = COLLECTIVE_TIMEOUT_S):
        import cupy
        from cupy.cuda import nccl

        self._cupy, self._nccl = cupy, nccl
        self.rank, self.size = rank, size
        self.check_peers = check_peers or (lambda: None)
        self.timeout_s = timeout_s
        # bf16 activations are stored as uint16 (cuda_ops.py); ncclBfloat16 is 9 in nccl.h.
        half = getattr(nccl, "NCCL_BFLOAT16", 9) if dtype == "bfloat16" else nccl.NCCL_FLOAT16
        self._types = {np.dtype(np.uint16): half, np.dtype(np.float16): nccl.NCCL_FLOAT16,
                       np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.int32): nccl.NCCL_INT32}
        self._comm = nccl.NcclCommunicator(size, unique_id, rank)

    @staticmethod
    def new_unique_id():
        """Rank 0 makes it; the rendezvous carries it to the others."""
        from cupy.cuda import nccl

        return nccl.get_unique_id()

    def _type(self, x) -> int:
        try:
            return self._types[x.dtype]
        except KeyError:
            raise TypeError(f"no NCCL type for dtype {x.dtype}") from None

    def _stream(self) -> int:
        return self._cupy.cuda.get_current_stream().ptr

    def all_reduce(self, x):
        """In place on x (contiguous); returns x."""
        self._comm.allReduce(x.data.ptr, x.data.ptr, x.size, self._type(x), self._nccl.NCCL_SUM,
                             self._stream())
        return x

    def gather(self, x):
        """x (R, n) -> rank 0: (R, size * n); others: None (their piece is sent)."""
        cupy, nccl = self._cupy, self._nccl
        x = cupy.ascontiguousarray(x)
        rows, n = x.shape
        stream, kind = self._stream(), self._type(x)
        if self.rank:
            self._comm.send(x.data.ptr, x.size, kind, 0, stream)
            return None
        parts = cupy.empty((self.size, rows, n), x.dtype)  # (size, R, n)
        parts[0] = x
        nccl.groupStart()
        for r in range(1, self.size):
            self._comm.recv(parts[r].data.ptr, x.size, kind, r, stream)
        nccl.groupEnd()
        return parts.transpose(1, 0, 2).reshape(rows, self.size * n)

    def broadcast(self, x):
        self._comm.bcast(x.data.ptr, x.size, self._type(x), 0, self._stream())
        return x

    def barrier(self) -> None:
        one = self._cupy.zeros(1, self._cupy.float32)
        self.all_reduce(one)
        event = self._cupy.cuda.Event(disable_timing=True)
        event.record()
        self.wait(event)

    def wait(self, event) -> None:
        """Block until `event` (recorded on the compute stream after some collectives) has
        passed, asking check_peers() meanwhile: a collective whose peer died never completes,
        so a plain wait would hang; then the communicator is aborted.

        NOTE: it polls the event (yielding the GIL between polls) rather than sleeping, which
        would add up to a sleep's granularity (~0.1 ms) to every decode step."""
        start = last_check = time.perf_counter()
        while not event.done:
            time.sleep(0)
            now = time.perf_counter()
            if now - last_check > PEER_CHECK_S:
                last_check = now
                try:
                    self.check_peers()
                    if now - start > self.timeout_s:
                        raise CommunicatorError(
                            f"a collective did not complete within {self.timeout_s:.0f} s")
                except CommunicatorError:
                    self._comm.abort()  # unblocks the stream's NCCL kernels
                    raise

    def close(self) -> None:
        if self._comm is not None:
            self._comm.destroy()
            self._comm = None

    def unlink(self) -> None:
        """Nothing to remove: NCCL's resources go with close()."""
