"""Data parallel: N engine cores behind one API process, each a full copy of the model on its
own GPU (or its own group of tensor-parallel GPUs).

    AsyncEngine --add--> DPClient --route--> MPClient 0 --ZeroMQ--> engine core 0 (GPU 0)
                                        \\--> MPClient 1 --ZeroMQ--> engine core 1 (GPU 1)
                <--one core's message at a time, stats summed over the cores--

The DPClient takes MPClient's commands and answers with its messages, so the API process runs
the same whatever N is; with N = 1 it is not used at all (core_client_for gives the MPClient).
A request lives on one core: the LoadBalancer (engine/core/dp_router.py) picks it, and aborts and
stop-string finishes go to that core. Each message carries the sum of the cores' latest stats
(/metrics, the stats line); `core_stats` keeps them apart. The dashboard sees core 0. A core that
dies, or hangs (each MPClient watches its own), ends the whole: its fatal message names it, and
the API process stops every core.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable

import zmq
import zmq.asyncio

from engine.core.dp_router import LoadBalancer
from engine.core.liveness import DEFAULT_LIVENESS, Liveness
from engine.core.outputs import EngineCoreOutputs, EngineCoreRequest, EngineStats
from engine.core_client import CoreDied, MPClient
from engine.core_process import CoreReady
from engine.executor.ops import DeviceError, resolve_device, visible_gpus
from engine.model.config import EngineConfig

logger = logging.getLogger("pagedserve.dp_client")


def core_client_for(engine_config: EngineConfig, make_core=None,
                    liveness: Liveness = DEFAULT_LIVENESS) -> MPClient | DPClient:
    """The client of the server's engine core(s): one MPClient, or a DPClient over several."""
    if engine_config.data_parallel_size == 1:
        return MPClient(engine_config, make_core, liveness=liveness)
    return DPClient(engine_config, make_core, liveness)


def gpus_per_core(engine_config: EngineConfig) -> int:
    """GPUs one engine core uses on this host: its tensor-parallel ranks here (tp_local_ranks;
    the others run on their own hosts' GPUs)."""
    return engine_config.tp_local_ranks or engine_config.tensor_parallel_size


def core_devices(engine_config: EngineConfig) -> list[str | None]:
    """Each core's CUDA_VISIBLE_DEVICES: core i gets GPUs [i * g, (i + 1) * g) of this
    process's (g = gpus_per_core); None for all on the cpu backend. DeviceError when there are
    too few GPUs."""
    num_cores, per_core = engine_config.data_parallel_size, gpus_per_core(engine_config)
    if resolve_device(engine_config.device) != "cuda":
        return [None] * num_cores
    gpus = visible_gpus()
    if num_cores * per_core > len(gpus):
        per = ("tensor_parallel_size" if engine_config.tp_local_ranks is None
               else "tp_local_ranks")
        raise DeviceError(
            f"data_parallel_size {num_cores} x {per} {per_core} needs "
            f"{num_cores * per_core} GPUs, but {len(gpus)} visible: {', '.join(gpus) or 'none'}")
    return [",".join(gpus[i * per_core : (i + 1) * per_core]) for i in range(num_cores)]


class DPClient:
    """MPClient's interface over engine_config.data_parallel_size cores."""

    def __init__(self, engine_config: EngineConfig, make_core=None,
                 liveness: Liveness = DEFAULT_LIVENESS):
        num_cores = engine_config.data_parallel_size
        self.devices = core_devices(engine_config)
        self.clients = [
            MPClient(dataclasses.replace(engine_config, data_parallel_rank=i), make_core,
                     self.devices[i], name=f"pagedserve-core-{i}", liveness=liveness)
            for i in range(num_cores)]
        self.balancer = LoadBalancer(num_cores, engine_config.block_size,
                                     prefix_aware=engine_config.enable_prefix_caching)
        self.core_stats: list[EngineStats | None] = [None] * num_cores
        self._inbox: collections.deque[tuple[int, EngineCoreOutputs]] = collections.deque()
        self._unaccepted: set[str] = set()  # routed, not yet accepted by their core
        self._poller: zmq.asyncio.Poller | None = None

    @property
    def num_cores(self) -> int:
        return len(self.clients)

    def start(self) -> None:
        """Spawn every core; they load at the same time."""
        for client in self.clients:
            client.start()

    def wait_ready(self) -> CoreReady:
        """Block until every core has loaded; raise the first failure, naming the core."""
        # All watched at once: a core that dies is seen while the others still load.
        readies = [None] * self.num_cores
        while any(ready is None for ready in readies):
            for i, client in enumerate(self.clients):
                if readies[i] is None:
                    try:
                        readies[i] = client.poll_ready(20)
                    except CoreDied as e:
                        raise CoreDied(f"engine core {i} of {self.num_cores}: {e}") from None
        first = readies[0]
        where = ("" if self.devices[0] is None else
                 " on GPUs " + " | ".join(str(d) for d in self.devices))
        summary = [*first.summary, f"data parallel: {self.num_cores} engine cores{where}, "
                                   "each with the KV cache above"]
        # The cores are alike, but each sized its cache from its own GPU's free memory.
        return CoreReady(first.model_config, min(r.max_model_len for r in readies),
                         min(r.num_kv_blocks for r in readies), summary)

    def attach(self, busy: Callable[[], bool] = lambda: False) -> None:
        self._poller = zmq.asyncio.Poller()
        for client in self.clients:
            client.attach(busy)
            self._poller.register(client.output_socket, zmq.POLLIN)

    def detach(self) -> None:
        for client in self.clients:
            client.detach()

    async def get_output_async(self) -> EngineCoreOutputs:
        """The next message of any core (one per core in turn when several wait)."""
        while not self._inbox:
            for i, client in enumerate(self.clients):
                message = client.get_output_nowait()
                if message is not None:
                    self._inbox.append((i, message))
            if not self._inbox:
                await self._poller.poll()
        return self._merged(*self._inbox.popleft())

    def _merged(self, core: int, message: EngineCoreOutputs) -> EngineCoreOutputs:
        balancer, unaccepted = self.balancer, self._unaccepted
        for request_id in message.accepted:
            if balancer.owner(request_id) == core:
                unaccepted.discard(request_id)
        if message.outputs:
            # Only the request's own: an id used again right after an abort (AsyncEngine's
            # callers pick ids) may run elsewhere, or not be accepted yet, while the aborted
            # one's last outputs still come; they must not end (or count against) the new one.
            message.outputs = [out for out in message.outputs
                               if balancer.owner(out.request_id) == core
                               and out.request_id not in unaccepted]
        for out in message.outputs:
            if out.finish_reason is not None:
                balancer.finish(out.request_id, out.index)
        for request_id, _field, _why in message.rejected:
            if balancer.owner(request_id) == core:
                unaccepted.discard(request_id)
                balancer.forget(request_id)
        if message.stats is not None:
            self.core_stats[core] = message.stats
            message.stats = sum_stats([s for s in self.core_stats if s is not None])
        if message.fatal is not None:
            message.fatal = f"engine core {core} of {self.num_cores}: {message.fatal}"
        return message

    def add_request(self, req: EngineCoreRequest) -> None:
        params = req.params
        running = params.beam_width if params.use_beam_search else params.n
        core = self.balancer.route(req.request_id, req.prompt_token_ids, params.n,
                                   params.cache_salt, running)
        self._unaccepted.add(req.request_id)
        self.clients[core].add_request(req)

    def abort_requests(self, request_ids: list[str]) -> None:
        by_core = collections.defaultdict(list)
        for request_id in request_ids:
            core = self.balancer.forget(request_id)
            self._unaccepted.discard(request_id)
            if core is not None:  # else it ended already
                by_core[core].append(request_id)
        for core, ids in by_core.items():
            self.clients[core].abort_requests(ids)

    def finish_sequences(self, items: list[tuple[str, int, str]]) -> None:
        by_core = collections.defaultdict(list)
        for item in items:
            core = self.balancer.owner(item[0])
            if core is not None:
                by_core[core].append(item)
                self.balancer.finish(item[0], item[1])
        for core, core_items in by_core.items():
            self.clients[core].finish_sequences(core_items)

    def request_snapshot(self, ticket: int, since: int | None) -> None:
        """The dashboard shows core 0 (its block tables, queues and counters)."""
        self.clients[0].request_snapshot(ticket, since)

    def shutdown(self, timeout: float = 5.0) -> None:
        for client in self.clients:  # all stop at once, then each is waited for
            client.ask_to_stop()
        for client in self.clients:
            client.shutdown(timeout)


def sum_stats(stats: list[EngineStats]) -> EngineStats:
    """The cores' stats added up: counts, gauges and KV blocks alike."""
    return EngineStats(**{f.name: sum(getattr(s, f.name) for s in stats)
                          for f in dataclasses.fields(EngineStats)})
