"""What every handler shares: the ready engine, the JSON body, tokenizing off the event loop,
the model check, disconnects."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import threading

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from engine.core.limits import MAX_JSON_DEPTH
from engine.model.chat_template import RenderTimeout
from server.async_engine import AsyncEngine
from server.protocol import APIError, bad_request, get_field

MAX_BODY_BYTES = 4 * 1024 * 1024
NO_TOKENIZER = "this model has no tokenizer; send token ids"
LONG_TEXT = 16_384  # characters; see off_loop
# A short chat's template renders on the event loop for at most this long; a template slower
# than that renders again on a worker thread (chat_token_ids), so /health never waits on it.
ON_LOOP_RENDER_SECONDS = 0.05


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
    raw = b"".join(chunks)
    # Every field of the body may reach the chat template (a role, tools, documents, template
    # kwargs), not only message content: chat_token_ids sizes its render by the whole body.
    request.state.body_bytes = len(raw)
    # A megabyte of token ids takes ~10 ms to parse and check: on a worker thread, between
    # whose steps the event loop gets the interpreter back.
    return await off_loop(len(raw) // 64, _parse_body, raw)


def _parse_body(raw: bytes) -> dict:
    too_deep = bad_request("body", f"the JSON body nests arrays and objects more than "
                                   f"{MAX_JSON_DEPTH} deep")
    try:
        body = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int of 4300+ digits
        raise bad_request("body", f"malformed JSON body: {e}") from None
    except RecursionError:  # the parser recurses per level; far past MAX_JSON_DEPTH
        raise too_deep from None
    if not isinstance(body, dict):
        raise bad_request("body", "the JSON body must be an object")
    field = _too_deep_field(body, MAX_JSON_DEPTH)
    if field is not None:
        raise bad_request(field, f"'{field}' nests arrays and objects too deep: the JSON body "
                                 f"may nest at most {MAX_JSON_DEPTH} deep")
    # A \ud800-style escape is valid JSON but no text: no tokenizer or UTF-8 encoder takes a lone
    # surrogate. Only a body that spells a \uD... escape can hold one.
    if b"\\ud" in raw or b"\\uD" in raw:
        where = _lone_surrogate(body, "")
        if where is not None:
            raise bad_request(where, f"'{where}' holds a lone UTF-16 "
                              "surrogate (an unpaired \\uD800-\\uDFFF escape), which is no text")
    return body


def _lone_surrogate(value, path: str) -> str | None:
    """The path (e.g. messages[0].content) of the first string, key or value, that cannot be
    encoded as UTF-8; None if every one can."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            # JSON keys are strings; the path goes back in the error body, so a bad key shows
            # as its escape (\ud800)
            shown = key.encode("utf-8", "backslashreplace").decode()
            at = f"{path}.{shown}" if path else shown
            found = _lone_surrogate(key, at)
            found = found if found is not None else _lone_surrogate(item, at)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def _too_deep_field(body: dict, limit: int) -> str | None:
    """The body's field (top-level key) whose arrays and objects nest more than `limit` deep
    (the body itself is depth 1), or None."""
    level = [(k, v) for k, v in body.items() if isinstance(v, (dict, list))]
    for _ in range(limit - 1):
        if not level:
            return None
        below = []
        for field, v in level:
            items = v.values() if isinstance(v, dict) else v
            # the types first, at C speed: a million token ids hold no container
            if _CONTAINERS & set(map(type, items)):
                below += [(field, c) for c in items if isinstance(c, (dict, list))]
        level = below
    return level[0][0] if level else None


_CONTAINERS = {dict, list}


def _lower_priority():
    # Bulk tokenizing yields the CPU to the event loop when cores are short (Linux nices each
    # thread on its own).
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


_TOKENIZE_POOL = concurrent.futures.ThreadPoolExecutor(
    max_workers=4, thread_name_prefix="pagedserve-tokenize", initializer=_lower_priority)


async def off_loop(num_chars: int, fn, *args):
    """fn(*args), on a worker thread when it tokenizes `num_chars` >= LONG_TEXT characters:
    megabytes take seconds, and the event loop must go on serving everyone else meanwhile."""
    if num_chars < LONG_TEXT:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZE_POOL, fn, *args)


# A JSON answer longer than this leaves in pieces of this size (large_json).
ANSWER_PIECE = 1 << 19


async def large_json(payload: dict, size_hint: int) -> Response:
    """A JSON answer that may run to megabytes (/tokenize of a 4 MB prompt: 6 MB of ids),
    written as Starlette's JSONResponse writes it but on a worker thread when size_hint (items
    or characters) is large, and sent in pieces: each is one write on the event loop."""
    body = await off_loop(size_hint, _json_bytes, payload)
    if len(body) <= ANSWER_PIECE:
        return Response(body, media_type="application/json")

    async def pieces():
        for i in range(0, len(body), ANSWER_PIECE):
            yield body[i : i + ANSWER_PIECE]

    return StreamingResponse(pieces(), media_type="application/json",
                             headers={"content-length": str(len(body))})


def _json_bytes(payload: dict) -> bytes:
    """The payload as compact JSON; a long list written 65,536 items at a time, since the
    encoder holds the interpreter for a whole call (~100 ms for a million ids)."""
    def dumps(value) -> str:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    step = 1 << 16
    fields = []
    for key, value in payload.items():
        if isinstance(value, list) and len(value) > step:
            pieces = (dumps(value[i : i + step])[1:-1] for i in range(0, len(value), step))
            fields.append(f"{dumps(key)}:[{','.join(pieces)}]")
        else:
            fields.append(f"{dumps(key)}:{dumps(value)}")
    return ("{" + ",".join(fields) + "}").encode()


def tokenizer_of(engine, param: str):
    """The engine's tokenizer, or a 400 naming `param`, the field that needed it."""
    if engine.tokenizer is None:
        raise bad_request(param, f"'{param}' needs a tokenizer, but {NO_TOKENIZER}")
    return engine.tokenizer


async def chat_token_ids(request: Request, engine, messages: list[dict],
                         **template_options) -> list[int]:
    """`messages` rendered by the model's chat template, as token ids (400 if it fails).
    `template_options`: add_generation_prompt, continue_final_message, template variables
    (e.g. tools)."""
    template_options.setdefault("add_generation_prompt", True)
    tokenizer = tokenizer_of(engine, "messages")
    special = request.app.state.settings.chat_content_special_tokens
    # The template may write any field (a 4 MB `role`, `tools`, `documents`): the whole body's
    # size decides, so a render that tokenizes megabytes never runs on the event loop.
    num_chars = max(sum(len(str(m.get("content"))) for m in messages),
                    getattr(getattr(request, "state", None), "body_bytes", 0))
    render = functools.partial(tokenizer.apply_chat_template, messages, tokenize=True,
                               special_tokens_in_content=special, **template_options)
    try:
        if num_chars < LONG_TEXT:
            try:  # a short chat renders on the loop, unless its template is slow
                return render(render_seconds=ON_LOOP_RENDER_SECONDS)
            except RenderTimeout:
                pass  # again on a worker thread, with the whole deadline
        ids = await asyncio.get_running_loop().run_in_executor(_TOKENIZE_POOL, render)
    except Exception as e:  # the template's own checks (raise_exception), sandbox refusals
        raise bad_request("messages", f"the chat template failed: {e}") from None
    return ids  # Encoding.ids: a list of ints (a million of them for 4 MB: no pass on the loop)


def check_model(request: Request, body: dict) -> str:
    """The name answers carry (the first served one) once the body's `model` is one served."""
    settings = request.app.state.settings
    name = settings.served_model_name
    model = get_field(body, "model", "str", name)
    if model != name and model not in settings.other_model_names:
        served = " or ".join(map(repr, (name, *settings.other_model_names)))
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served}",
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
    if not ids or (set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < vocab):
        return  # at C speed (bool is a type of its own); the loop below names a bad id
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
