"""The Starlette app: engine lifecycle, auth, body limits, and the small endpoints.

The generation endpoints live in server/openai_routes.py. The engine loads on its own thread at
start-up, so /health answers 503 until it is ready instead of the port staying closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.core.limits import MAX_JSON_DEPTH
from engine.model.config import EngineConfig
from server.async_engine import AsyncEngine
from server.dashboard import DashboardFeed, dashboard_routes
from server.guards import LOOPBACK_HOSTS, HostGuard, RequestGuard
from server.metrics import ServerMetrics
from server.protocol import APIError, bad_request, get_field, parse_messages

log = logging.getLogger("pagedserve.server")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MAX_BODY_BYTES = 4 * 1024 * 1024
NO_TOKENIZER = "this model has no tokenizer; send token ids"
LONG_TEXT = 16_384  # characters; see off_loop


@dataclass
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    max_waiting_requests: int | None = None  # None: no limit
    max_body_bytes: int = MAX_BODY_BYTES
    chat_content_special_tokens: bool = False  # True: HF's way, a client may forge turns


def create_app(engine_config: EngineConfig | None = None, *, served_model_name: str | None = None,
               api_key: str | None = None, max_waiting_requests: int | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, make_engine=None,
               allowed_hosts: list[str] | None = LOOPBACK_HOSTS,
               allowed_origins: list[str] | None = None,
               chat_content_special_tokens: bool = False, dashboard: bool = True) -> Starlette:
    """An app that loads the engine in the background; `make_engine` replaces LLMEngine(config).

    `allowed_hosts`: the Host names served (None: any); `allowed_origins`: the web origins CORS
    lets in (None: CORS off). server/guards.py says why.
    """
    from server.openai_routes import chat_completions, completions

    config = engine_config or EngineConfig()
    if make_engine is None:
        def make_engine():
            from engine.engine import LLMEngine

            return LLMEngine(config)

    metrics = ServerMetrics()
    engine = AsyncEngine(make_engine, metrics)
    settings = ServerSettings(served_model_name or config.model or DEFAULT_MODEL_NAME, api_key,
                              max_waiting_requests, max_body_bytes, chat_content_special_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/version", version, methods=["GET"]),
    ]
    if dashboard:
        routes += dashboard_routes()
    handlers = {APIError: _api_error, 404: _not_found, 405: _not_allowed, Exception: _crash}
    # The first is the outermost: a wrong Host is refused before anything else; a CORS preflight
    # is answered before the key check (browsers send no key on it).
    middleware = [Middleware(HostGuard, allowed=allowed_hosts)]
    if allowed_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=allowed_origins,
                                     allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    middleware.append(Middleware(RequestGuard, api_key=api_key))
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan,
                    middleware=middleware)
    app.state.engine, app.state.metrics, app.state.settings = engine, metrics, settings
    app.state.dashboard = DashboardFeed(engine.snapshot)
    return app


# ---------------------------------------------------------------- shared helpers


def ready_engine(request: Request):
    """The loaded engine, or a 503 while it loads (or a 500 if loading failed)."""
    engine: AsyncEngine = request.app.state.engine
    if engine.load_error is not None:
        raise APIError(500, f"the model failed to load: {engine.load_error}", type="server_error")
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
    too_deep = bad_request("body", f"the JSON body nests arrays and objects more than "
                                   f"{MAX_JSON_DEPTH} deep")
    try:
        body = json.loads(b"".join(chunks))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int of 4300+ digits
        raise bad_request("body", f"malformed JSON body: {e}") from None
    except RecursionError:  # the parser recurses per level; far past MAX_JSON_DEPTH
        raise too_deep from None
    if not isinstance(body, dict):
        raise bad_request("body", "the JSON body must be an object")
    if _depth_exceeds(body, MAX_JSON_DEPTH):
        raise too_deep
    return body


def _depth_exceeds(value, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` deep (the body itself is depth 1)."""
    level = [value]
    for _ in range(limit):
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v)
                 if isinstance(c, (dict, list))]
        if not level:
            return False
    return True


async def off_loop(num_chars: int, fn, *args):
    """fn(*args), on a worker thread when it tokenizes `num_chars` >= LONG_TEXT characters:
    megabytes take seconds, and the event loop must go on serving everyone else meanwhile."""
    if num_chars < LONG_TEXT:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def tokenizer_of(engine, param: str):
    """The engine's tokenizer, or a 400 naming `param`, the field that needed it."""
    if engine.tokenizer is None:
        raise bad_request(param, f"'{param}' needs a tokenizer, but {NO_TOKENIZER}")
    return engine.tokenizer


async def chat_token_ids(request: Request, engine, messages: list[dict]) -> list[int]:
    """`messages` rendered by the model's chat template, as token ids (400 if it fails)."""
    tokenizer = tokenizer_of(engine, "messages")
    special = request.app.state.settings.chat_content_special_tokens
    num_chars = sum(len(str(m.get("content"))) for m in messages)
    try:
        ids = await off_loop(num_chars, functools.partial(
            tokenizer.apply_chat_template, messages, add_generation_prompt=True, tokenize=True,
            special_tokens_in_content=special))
    except Exception as e:  # the template's own checks (raise_exception), sandbox refusals
        raise bad_request("messages", f"the chat template failed: {e}") from None
    return [int(t) for t in ids]


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


# ---------------------------------------------------------------- small endpoints


async def health(request: Request):
    engine: AsyncEngine = request.app.state.engine
    if engine.load_error is not None:
        return JSONResponse({"status": "error", "error": str(engine.load_error)}, 500)
    if not engine.is_ready:
        return JSONResponse({"status": "loading"}, 503)
    return JSONResponse({"status": "ok"})


async def metrics_endpoint(request: Request):
    body = request.app.state.metrics.render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


async def models(request: Request):
    engine = ready_engine(request)
    card = {"id": request.app.state.settings.served_model_name, "object": "model",
            "created": int(time.time()), "owned_by": "pagedserve",
            "max_model_len": engine.max_model_len}
    return JSONResponse({"object": "list", "data": [card]})


async def version(request: Request):
    return JSONResponse({"version": package_version()})


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("pagedserve")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, never installed
        return "unknown"


async def tokenize(request: Request):
    engine = ready_engine(request)
    body = await read_json(request)
    if "messages" in body:
        ids = await chat_token_ids(request, engine, parse_messages(body))
    else:
        prompt = get_field(body, "prompt", "str")
        if prompt is None:
            raise bad_request("prompt", "give 'prompt' (a string) or 'messages'")
        ids = await off_loop(len(prompt), tokenizer_of(engine, "prompt").encode, prompt)
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len})


async def detokenize(request: Request):
    engine = ready_engine(request)
    body = await read_json(request)
    tokens = get_field(body, "tokens", "list")
    if tokens is None:
        raise bad_request("tokens", "'tokens' is required")
    check_token_ids(engine, tokens, "tokens")
    text = tokenizer_of(engine, "tokens").decode(tokens, skip_special_tokens=False)
    return JSONResponse({"prompt": text})


def check_token_ids(engine, ids: list, param: str):
    vocab = engine.model_config.vocab_size
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
            raise bad_request(param, f"'{param}' holds {t!r}, not a token id in [0, {vocab})")


# ---------------------------------------------------------------- errors


async def _api_error(request, exc: APIError):
    return exc.response()


async def _not_found(request, exc):
    return APIError(404, f"no route {request.url.path}", code="not_found").response()


async def _not_allowed(request, exc):
    return APIError(405, f"{request.method} is not allowed on {request.url.path}").response()


async def _crash(request, exc):
    log.exception("unhandled error", exc_info=exc)
    return APIError(500, f"internal error: {exc}", type="server_error").response()
