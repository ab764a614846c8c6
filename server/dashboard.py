"""The live dashboard: `/dashboard` (one self-contained page), `/dashboard/events` (its SSE feed)
and the example traces it can replay.

One feed per app polls the engine for a snapshot delta (AsyncEngine.snapshot: the engine-core
process takes it between steps) at most UPDATES_PER_S times a second, and only while someone
watches. It keeps the full picture (DashboardState) so a viewer who joins late starts from a
keyframe of it, and every viewer then gets the same deltas. The page holds no data: it is served
without the API key; the feed asks for it like the API does (the page sends it with fetch, not
EventSource, which cannot set headers).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from engine.core.introspect import DashboardState
from server.protocol import APIError

log = logging.getLogger("pagedserve.dashboard")
STATIC = Path(__file__).parent / "static"
TRACES = STATIC / "traces"
UPDATES_PER_S = 10
# Snapshots are taken in the engine-core process: the feed waits at least this many times what the
# last one cost there (its "cost_s"), so a dashboard never takes more than ~0.5% of the engine.
COST_FACTOR = 200
MAX_BACKLOG = 20  # a viewer this many updates behind is resent a keyframe instead
# A feed response ends after this long and the page reconnects at once: uvicorn waits for open
# responses before it stops, and a feed would otherwise never end.
MAX_STREAM_S = 15.0

# since -> snapshot dict; raises LookupError while the engine is not ready.
SnapshotFn = Callable[[int | None], Awaitable[dict]]


class DashboardFeed:
    def __init__(self, snapshot: SnapshotFn, updates_per_s: float = UPDATES_PER_S):
        self._snapshot = snapshot
        self._interval = 1.0 / updates_per_s
        self.state = DashboardState()
        self._viewers: set[asyncio.Queue] = set()
        self._task: asyncio.Task | None = None
        self._closed = False

    def close(self) -> None:
        """The server is stopping: every feed ends now (None in its queue), not when the drain
        runs out on it."""
        self._closed = True
        for queue in self._viewers:
            queue.put_nowait(None)

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        if self._closed:
            queue.put_nowait(None)
        elif self.state.version:
            queue.put_nowait(_encode(self.state.keyframe()))
        self._viewers.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._viewers.discard(queue)

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        # closed: no more updates, which could drain a backlogged viewer's end marker away
        while self._viewers and not self._closed:
            start = loop.time()
            try:
                snap = await asyncio.wait_for(self._snapshot(self.state.version or None), 5.0)
            except (LookupError, asyncio.TimeoutError):  # loading, or the engine is gone
                await asyncio.sleep(0.5)
                continue
            except Exception:
                log.exception("the dashboard snapshot failed")
                await asyncio.sleep(1.0)
                continue
            if self._closed:
                return
            try:
                self.state.apply(snap)
            except ValueError:  # a delta this state cannot take: start again from a keyframe
                log.warning("the dashboard feed lost its place; asking for a keyframe")
                self.state = DashboardState()
                continue
            message = _encode(snap)
            for queue in self._viewers:
                if snap["kind"] == "delta" and queue.qsize() >= MAX_BACKLOG:
                    while not queue.empty():
                        queue.get_nowait()
                    message_for_it = _encode(self.state.keyframe())
                else:
                    message_for_it = message
                queue.put_nowait(message_for_it)
            interval = max(self._interval, COST_FACTOR * snap.get("cost_s", 0.0))
            await asyncio.sleep(max(0.0, interval - (loop.time() - start)))


def _encode(snap: dict) -> str:
    return json.dumps(snap, separators=(",", ":"))


# ---------------------------------------------------------------- routes


async def page(request: Request):
    return FileResponse(STATIC / "dashboard.html", media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})


async def events(request: Request):
    feed: DashboardFeed = request.app.state.dashboard

    async def stream():
        # Subscribed here, not in the handler: a client gone before the response starts (an
        # ASGI 2.4 server's send raises OSError) leaves this generator unstarted, and its
        # `finally` would never unsubscribe a queue taken outside it (the feed would poll the
        # engine for it forever).
        queue = feed.subscribe()
        loop = asyncio.get_running_loop()
        end = loop.time() + MAX_STREAM_S
        try:
            while (left := end - loop.time()) > 0:
                try:  # an engine that went quiet (dead) must not hold the feed open
                    message = await asyncio.wait_for(queue.get(), left)
                except asyncio.TimeoutError:
                    break
                if message is None:  # the server is stopping
                    break
                yield f"data: {message}\n\n"
        finally:
            feed.unsubscribe(queue)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _trace_names() -> list[str]:
    return sorted(p.stem for p in TRACES.glob("*.json") if p.is_file())


async def trace_list(request: Request):
    return JSONResponse(_trace_names())


async def trace_file(request: Request):
    # one of the listed names, never a path built from the request's text first (a name past
    # the file system's length limit made is_file() raise: a 500)
    name = request.path_params["name"]
    if name not in _trace_names():
        raise APIError(404, f"no example trace {name!r}", param="name", code="not_found")
    return FileResponse(TRACES / f"{name}.json", media_type="application/json")


def dashboard_routes() -> list[Route]:
    return [
        Route("/dashboard", page, methods=["GET"]),
        Route("/dashboard/events", events, methods=["GET"]),
        Route("/dashboard/traces", trace_list, methods=["GET"]),
        Route("/dashboard/traces/{name}", trace_file, methods=["GET"]),
    ]
