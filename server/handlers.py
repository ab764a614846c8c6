"""What every handler shares: the ready engine, the JSON body, the model check, disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.async_engine import AsyncEngine
from server.protocol import APIError, bad_request, get_field


def ready_engine(request: Request):
    """What handlers read of the served model (AsyncEngine.engine: tokenizer, model_config,
    max_model_len), or a 503 while it loads or once the core died (a 500 if loading failed)."""
    engine: AsyncEngine = request.app.state.engine
    if engine.load_error is not None:
        raise APIError(500, f"the model failed to load: {engine.load_error}", type="server_error")
    if engine.dead is not None:
        raise APIError(503, f"the engine core died: {engine.dead}", type="server_error",
                       code="engine_dead")
    if not engine.is_ready:
        raise APIError(503, "the model is still loading; retry shortly", type="server_error",
                       code="model_loading")
    return engine.engine


async def read_json(request: Request) -> dict:
    """The body as a JSON object, at most max_body_bytes long, else 413 / 400."""
    limit = request.app.state.settings.max_body_bytes
    too_big = APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():  # the header may lie or be absent (chunked)
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request("body", f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise bad_request("body", "the JSON body must be an object")
    return body


def check_model(request: Request, body: dict) -> str:
    name = request.app.state.settings.served_model_name
    model = get_field(body, "model", "str", name)
    if model != name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {name!r}",
                       param="model", code="model_not_found")
    return name


async def until_disconnect(request: Request, work):
    """Await `work`; if the client disconnects first, cancel it (its requests get aborted)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return Response(status_code=499)  # nobody is left to read it
    return task.result()


async def _wait_disconnect(request: Request):
    while (await request.receive())["type"] != "http.disconnect":
        pass


def check_token_ids(engine, ids: list, param: str):
    vocab = engine.model_config.vocab_size
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
            raise bad_request(param, f"'{param}' holds {t!r}: token id {t!r} is out of "
                                     f"vocabulary (vocab_size {vocab})")


def load_tracked(handler):
    """The handler, counted in app.state.server_load (GET /load) while it runs, a streamed
    answer until it ends or its client leaves, when server load tracking is on."""
    @functools.wraps(handler)
    async def tracked(request: Request):
        state = request.app.state
        if not state.settings.enable_server_load_tracking:
            return await handler(request)
        state.server_load += 1

        def done():
            state.server_load -= 1

        try:
            response = await handler(request)
        except BaseException:
            done()
            raise
        if hasattr(response, "on_close"):  # a stream: counted until it closes
            response.on_close = done
        else:
            done()
        return response

    return tracked


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator, so a client gone mid-stream has its
    requests aborted at once rather than when the generator is garbage-collected."""

    on_close = None  # called once the stream ends, however it ends (handlers.load_tracked)

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except OSError:
            pass  # the client went away between chunks
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                if self.on_close is not None:
                    self.on_close()
