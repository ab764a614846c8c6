"""The Starlette app: engine lifecycle, guards, and the small endpoints.

The generation endpoints live in server/openai_routes.py (+ generation_call.py, sse_stream.py),
what handlers share in server/handlers.py. The engine core loads in its own process
(engine/core_process.py); an app started without AsyncEngine.load() (tests) answers /health 503
until it is ready instead of keeping the port closed, and 503 again if the core dies.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.core.liveness import DEFAULT_LIVENESS, Liveness
from engine.model.config import EngineConfig
from server import package_version
from server.async_engine import AsyncEngine, EngineFault
from server.dashboard import DashboardFeed, dashboard_routes
from server.extras import check_chat_special_tokens
from server.guards import (
    LOOPBACK_HOSTS,
    CORSGuard,
    HostGuard,
    RequestGuard,
    RootPath,
    route_path,
)
from server.handlers import (
    MAX_BODY_BYTES,
    check_model,
    check_token_ids,
    large_json,
    load_tracked,
    off_loop,
    read_json,
    ready_engine,
    tokenizer_of,
)
from server.metrics import ServerMetrics
from server.openai_routes import (
    chat_completions,
    chat_completions_batch,
    completions,
    invocations,
    render_chat,
)
from server.protocol import APIError, bad_request, get_field, parse_messages
from server.responses import (
    DEFAULT_MAX_STORED_RESPONSES,
    ResponseStore,
    create_response,
    delete_response,
    get_response,
)
from server.tool_calls import parse_tools

log = logging.getLogger("pagedserve.server")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    max_waiting_requests: int | None = None  # None: no limit
    max_body_bytes: int = MAX_BODY_BYTES
    chat_content_special_tokens: bool = False  # True: HF's way, a client may forge turns
    enable_server_load_tracking: bool = False  # count calls in flight for GET /load
    return_tokens_as_token_ids: bool = False  # the default of the request field of that name
    force_include_usage: bool = False  # every stream carries usage, on every chunk (vLLM's flag)
    per_request_metrics: bool = False  # answers carry the request's timings (vLLM's flag)
    reasoning_parser: str | None = None  # chat answers' <think> blocks as `reasoning`
    # More names requests may send (vLLM's --served-model-name A B: answers name the first)
    other_model_names: tuple[str, ...] = ()


def create_app(engine_config: EngineConfig | None = None, *,
               served_model_name: str | list[str] | None = None,
               api_key: str | None = None, max_waiting_requests: int | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, make_core=None,
               on_fatal: Callable[[str], None] | None = None,
               allowed_hosts: list[str] | None = LOOPBACK_HOSTS,
               allowed_origins: list[str] | None = None,
               chat_content_special_tokens: bool = False, dashboard: bool = True,
               enable_server_load_tracking: bool = False,
               return_tokens_as_token_ids: bool = False,
               force_include_usage: bool = False, root_path: str = "",
               enable_tokenizer_info_endpoint: bool = False,
               enable_per_request_metrics: bool = False,
               max_stored_responses: int = DEFAULT_MAX_STORED_RESPONSES,
               reasoning_parser: str | None = None,
               liveness: Liveness = DEFAULT_LIVENESS,
               chat_template: str | None = None) -> Starlette:
    """An app whose engine core runs in its own process (app.state.engine, an AsyncEngine).

    `make_core`: a picklable callable the core process runs instead of EngineCore(config).
    `on_fatal(cause)`: called once if the core dies (the CLI stops the server, exit status 1),
    or hangs: `liveness` says how long a silent or stuck core is waited on.
    `allowed_hosts`: the Host names served (None: any); `allowed_origins`: the web origins CORS
    lets in (None: CORS off). server/guards.py says why. `max_stored_responses`: how many
    /v1/responses answers are kept for GET and previous_response_id (server/responses.py).
    `reasoning_parser` (server/reasoning.py KINDS): chat answers' reasoning apart from content.
    `chat_template`: a jinja template's source that renders every chat in place of the model's.
    """
    config = engine_config or EngineConfig()
    metrics = ServerMetrics()
    engine = AsyncEngine(config, make_core, metrics, on_fatal, liveness, chat_template)
    names = [served_model_name] if isinstance(served_model_name, str) else \
        list(served_model_name or ())
    names = [name for name in names if name]  # none given: the model's
    settings = ServerSettings(names[0] if names else config.model or DEFAULT_MODEL_NAME, api_key,
                              max_waiting_requests, max_body_bytes, chat_content_special_tokens,
                              enable_server_load_tracking, return_tokens_as_token_ids,
                              force_include_usage, enable_per_request_metrics,
                              reasoning_parser,
                              tuple(n for n in dict.fromkeys(names) if n != names[0]))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await engine.shutdown()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),  # names may hold a '/'
        Route("/v1/completions", load_tracked(completions), methods=["POST"]),
        Route("/v1/chat/completions", load_tracked(chat_completions), methods=["POST"]),
        Route("/v1/chat/completions/batch", load_tracked(chat_completions_batch),
              methods=["POST"]),
        Route("/v1/responses", load_tracked(create_response), methods=["POST"]),
        Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
        Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
        Route("/invocations", load_tracked(invocations), methods=["POST"]),
        Route("/load", load, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/version", version, methods=["GET"]),
        Route("/debug/first_token", first_token_stages, methods=["GET"]),
    ]
    if enable_tokenizer_info_endpoint:  # off by default: it shows the chat template
        routes.append(Route("/tokenizer_info", tokenizer_info, methods=["GET"]))
    if dashboard:
        routes += dashboard_routes()
    handlers = {APIError: _api_error, EngineFault: _engine_fault, 404: _not_found,
                405: _not_allowed, Exception: _crash}
    # The first is the outermost: the --root-path prefix comes off every path, then a wrong Host
    # is refused before anything else; a CORS preflight
    # is answered before the key check (browsers send no key on it).
    middleware = [Middleware(RootPath, root_path=root_path)] if root_path else []
    middleware.append(Middleware(HostGuard, allowed=allowed_hosts))
    if allowed_origins:
        middleware.append(Middleware(CORSGuard, allow_origins=allowed_origins,
                                     allow_methods=["GET", "POST", "DELETE"],
                                     # any header, as vLLM: the OpenAI JS SDK sends its own
                                     # (X-Stainless-*) on every call from a page
                                     allow_headers=["*"]))
    posted = {r.path for r in routes if "POST" in (getattr(r, "methods", None) or ())}
    middleware.append(Middleware(RequestGuard, api_key=api_key, json_paths=posted))
    middleware.append(Middleware(CrashGuard))
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan,
                    middleware=middleware)
    app.state.engine, app.state.metrics, app.state.settings = engine, metrics, settings
    app.state.server_load = 0  # generation calls in flight (load_tracked)
    app.state.responses = ResponseStore(max_stored_responses)
    app.state.dashboard = DashboardFeed(engine.snapshot)
    return app


class CrashGuard:
    """A bug in a handler answers its request with a 500 and leaves the connection serving.

    Starlette's outermost middleware sends the `Exception` handler's 500 and then raises the
    error again, for the server to log; uvicorn then closes the connection, and a client's next
    request on it fails. Innermost among the middleware, this one logs the error and sends the
    same 500 itself; once a response has started (a stream), there is nothing left to answer
    with, and the error goes on as before."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:
                raise
            response = await _crash(Request(scope), exc)
            await response(scope, receive, send)


# ---------------------------------------------------------------- small endpoints


async def health(request: Request):
    engine: AsyncEngine = request.app.state.engine
    if engine.load_error is not None:
        return JSONResponse({"status": "error", "error": str(engine.load_error)}, 500)
    if engine.dead is not None:
        return JSONResponse({"status": "error", "error": f"the engine core died: {engine.dead}"},
                            503)
    if not engine.is_ready:
        return JSONResponse({"status": "loading"}, 503)
    return JSONResponse({"status": "ok"})


async def load(request: Request):
    """vLLM's server load: generation calls in flight (0 unless load tracking is on)."""
    return JSONResponse({"server_load": request.app.state.server_load})


async def tokenizer_info(request: Request):
    """vLLM's GET /tokenizer_info (--enable-tokenizer-info-endpoint): what a client needs to
    tokenize as the server does: the special tokens, the chat template, the length limit."""
    engine = ready_engine(request)
    tok = tokenizer_of(engine, "tokenizer_info")
    added = tok.tokenizer.get_added_tokens_decoder()
    return JSONResponse({
        "tokenizer_class": "PreTrainedTokenizerFast",  # a tokenizers-library tokenizer, as HF's
        "bos_token": tok.bos_token, "eos_token": tok.eos_token,
        **tok.special_tokens,
        "chat_template": tok.chat_template,
        "model_max_length": engine.max_model_len,
        "added_tokens_decoder": {str(i): {"content": t.content, "special": t.special}
                                 for i, t in sorted(added.items())},
    })


async def metrics_endpoint(request: Request):
    body = request.app.state.metrics.render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


async def models(request: Request):
    settings = request.app.state.settings
    return JSONResponse({"object": "list", "data": [
        _model_card(request, name)
        for name in (settings.served_model_name, *settings.other_model_names)]})


async def model(request: Request):
    """GET /v1/models/{model} (the SDK's models.retrieve): the card, or 404 naming the model."""
    check_model(request, {"model": request.path_params["model"]})
    return JSONResponse(_model_card(request, request.path_params["model"]))


def _model_card(request: Request, name: str) -> dict:
    engine = ready_engine(request)
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "pagedserve",
            "max_model_len": engine.max_model_len}


async def first_token_stages(request: Request):
    """Where the last requests' first tokens waited: server/timeline.py."""
    return JSONResponse(request.app.state.engine.timeline.as_json())


async def version(request: Request):
    return JSONResponse({"version": package_version()})


async def tokenize(request: Request):
    engine = ready_engine(request)
    body = await read_json(request)
    check_model(request, body)
    if "messages" in body:
        messages = parse_messages(body)
        check_chat_special_tokens(body)
        ids, _ = await render_chat(request, engine, body, messages, *parse_tools(body))
    else:
        prompt = get_field(body, "prompt", "str")
        if prompt is None:
            raise bad_request("prompt", "give 'prompt' (a string) or 'messages'")
        add_special = get_field(body, "add_special_tokens", "bool", True)
        ids = await off_loop(len(prompt), tokenizer_of(engine, "prompt").encode, prompt,
                             add_special)
    strs = None
    if get_field(body, "return_token_strs", "bool", False):  # vLLM's: the vocabulary's spelling
        id_to_token = engine.tokenizer.id_to_token  # a million ids: on a worker thread
        strs = await off_loop(len(ids), lambda: [id_to_token(i) for i in ids])
    return await large_json({"tokens": ids, "count": len(ids),
                             "max_model_len": engine.max_model_len, "token_strs": strs}, len(ids))


async def detokenize(request: Request):
    engine = ready_engine(request)
    body = await read_json(request)
    check_model(request, body)
    tokens = get_field(body, "tokens", "list")
    if tokens is None:
        raise bad_request("tokens", "'tokens' is required")
    tokenizer = tokenizer_of(engine, "tokens")

    def checked_decode():  # a million ids: checked and decoded on a worker thread
        check_token_ids(engine, tokens, "tokens")
        return tokenizer.decode(tokens, skip_special_tokens=False)

    text = await off_loop(len(tokens), checked_decode)
    return await large_json({"prompt": text}, len(text) // 4)


# ---------------------------------------------------------------- errors


async def _api_error(request, exc: APIError):
    return exc.response()


async def _engine_fault(request, exc: EngineFault):
    return APIError(500, str(exc), type="server_error").response()


async def _not_found(request, exc):
    return APIError(404, f"no route {route_path(request.scope)}", code="not_found").response()


async def _not_allowed(request, exc):
    return APIError(405, f"{request.method} is not allowed on {route_path(request.scope)}",
                    headers=getattr(exc, "headers", None)).response()  # its Allow header


async def _crash(request, exc):
    if isinstance(exc, ClientDisconnect):  # gone while sending its body: no error of ours
        log.debug("client left while sending %s", request.url.path)
        return Response(status_code=499)  # nobody reads it
    log.exception("unhandled error", exc_info=exc)
    return APIError(500, f"internal error: {exc}", type="server_error").response()
