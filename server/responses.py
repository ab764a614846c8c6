"""POST /v1/responses (OpenAI's Responses API), GET and DELETE /v1/responses/{id}.

A response is a chat call (server/openai_routes.chat_call: the chat template, sampling, limits,
tool calls, structured outputs, disconnects) whose request server/responses_request.py reads and
whose answer is built here: a Response object, or its SSE events (response.created, the output
items' events, response.completed). Stored responses (store: true, the default) keep their
conversation, which previous_response_id continues, in a bounded LRU (ResponseStore).
"""

from __future__ import annotations

import uuid
from collections import OrderedDict

from starlette.requests import Request
from starlette.responses import JSONResponse

from server.async_engine import EngineFault
from server.generation_call import GenerationCall
from server.handlers import read_json
from server.openai_routes import chat_call
from server.protocol import APIError, bad_request
from server.responses_request import (
    ResponsesRequest,
    chat_body,
    continued,
    conversation,
    in_responses_words,
    read_request,
)
from server.sse_stream import chat_chunks, sse
from server.timeline import mark_arrival

DEFAULT_MAX_STORED_RESPONSES = 256


class ResponseStore:
    """The stored responses, each with the chat conversation it ends (its instructions left
    out, as OpenAI carries none over); past `capacity`, the least recently used goes. Each
    entry holds its whole conversation, up to the body limit of every turn that made it."""

    def __init__(self, capacity: int = DEFAULT_MAX_STORED_RESPONSES):
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()

    def put(self, response: dict, messages: list[dict]) -> None:
        self._entries[response["id"]] = (response, messages)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> tuple[dict, list[dict]]:
        """(the response, its conversation), or a 404 naming `param`, the field that gave the
        id (None: the path)."""
        entry = self._entries.get(response_id)
        if entry is None:
            what = "Previous response" if param == "previous_response_id" else "Response"
            raise APIError(404, f"{what} with id {response_id!r} not found (responses are kept "
                                f"in memory, the last {self.capacity} stored)", param=param,
                           code="not_found")
        self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self._entries[response_id]


# ---------------------------------------------------------------- routes


async def create_response(request: Request):
    mark_arrival(request)
    body = await read_json(request)
    asked = read_request(body)
    store: ResponseStore = request.app.state.responses
    history = []
    if asked.previous_response_id is not None:
        _, history = store.get(asked.previous_response_id, "previous_response_id")
    messages = conversation(history, asked.input)
    try:
        call, ids = await chat_call(request, chat_body(asked, messages, body.get("model")),
                                    f"resp_{uuid.uuid4().hex}", ResponsesCall)
        call.asked, call.messages = asked, messages
        call.store = store if asked.store else None
        return await call.run([ids], asked.stream, include_usage=True)
    except APIError as e:
        raise in_responses_words(e) from None


async def get_response(request: Request):
    if request.query_params.get("stream") not in (None, "false"):
        raise bad_request("stream", "a stored response is not streamed again")
    response, _ = request.app.state.responses.get(request.path_params["response_id"])
    return JSONResponse(response)


async def delete_response(request: Request):
    response_id = request.path_params["response_id"]
    request.app.state.responses.delete(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


# ---------------------------------------------------------------- the answer


class ResponsesCall(GenerationCall):
    """A chat call answered as a Response (reply) or as the Responses API's events (stream)."""

    asked: ResponsesRequest
    messages: list[dict]  # the conversation asked about, its instructions left out
    store: ResponseStore | None  # None: store false

    def reply(self, body: dict) -> dict:
        [choice] = body["choices"]
        message = choice["message"]
        return self.finished(message["content"] or "", message.get("tool_calls") or [],
                             choice["finish_reason"], body["usage"], message.get("reasoning"))

    def stream(self, group, include_usage: bool):
        return response_events(self, group)

    def finished(self, text: str, calls: list[dict], finish_reason: str, chat_usage: dict,
                 reasoning: str | None = None) -> dict:
        """The finished Response (stored when asked) of the chat's text, tool calls, finish
        reason, usage and reasoning (--reasoning-parser): the one builder of streamed and whole
        answers alike."""
        status = "incomplete" if finish_reason == "length" else "completed"
        # the reasoning is complete where text or calls came after it
        output = ([reasoning_item(self.id, reasoning, "completed" if text or calls else status)]
                  if reasoning else [])
        if text or not (calls or reasoning):
            output.append(message_item(self.id, text, status))
        output += [function_call_item(c, "completed") for c in calls]
        if calls and status == "incomplete":  # the last call was cut: its arguments end short
            output[-1]["status"] = "incomplete"
        prompt, details = chat_usage["prompt_tokens"], chat_usage["prompt_tokens_details"]
        # cache_write_tokens (required by the SDK's type): the prompt tokens this request wrote
        # to the prefix cache, the chat usage's created_cache_tokens
        usage = {"input_tokens": prompt,
                 "input_tokens_details": {"cached_tokens": details["cached_tokens"],
                                          "cache_write_tokens": details["created_cache_tokens"]},
                 "output_tokens": chat_usage["completion_tokens"],
                 "output_tokens_details": {"reasoning_tokens": self._count(reasoning)},
                 "total_tokens": chat_usage["total_tokens"]}
        response = self.response(status, output, usage)
        if self.store is not None:
            self.store.put(response, continued(self.messages, output))
        return response

    def _count(self, reasoning: str | None) -> int:
        """The reasoning's tokens, as its text encodes (the parser splits text, not ids)."""
        if not reasoning:
            return 0
        return len(self.engine.tokenizer.encode(reasoning, add_special_tokens=False))

    def response(self, status: str, output: list[dict] | None = None,
                 usage: dict | None = None) -> dict:
        """The Response object: its state, and the request's settings echoed."""
        asked, body = self.asked, self.asked.body
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "error": None,
            "incomplete_details": ({"reason": "max_output_tokens"} if status == "incomplete"
                                   else None),
            "model": self.model, "output": output or [], "usage": usage,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "temperature": self.params.temperature, "top_p": self.params.top_p,
            "tools": asked.tools, "tool_choice": asked.tool_choice,
            "text": {"format": asked.text_format},
            "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
            "metadata": asked.metadata or {},
            "previous_response_id": asked.previous_response_id, "store": asked.store,
            "truncation": "disabled", "reasoning": None, "background": False,
            "user": body.get("user"),
        }


def message_item(response_id: str, text: str, status: str) -> dict:
    """The response's one message; its id follows from the response's, so that a stream's
    events and its closing response name it alike."""
    return {"id": "msg_" + response_id.removeprefix("resp_"), "type": "message",
            "role": "assistant", "status": status, "content": [output_text(text)]}


def reasoning_item(response_id: str, text: str, status: str) -> dict:
    """The answer's reasoning (--reasoning-parser) as its text, with no summary."""
    return {"id": "rs_" + response_id.removeprefix("resp_"), "type": "reasoning", "summary": [],
            "content": [reasoning_text(text)], "status": status}


def reasoning_text(text: str) -> dict:
    return {"type": "reasoning_text", "text": text}


def output_text(text: str) -> dict:
    """A text part: no annotations, and no logprobs (none are returned: an empty list, as
    OpenAI sends when the request's include has no message.output_text.logprobs)."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(call: dict, status: str) -> dict:
    """A chat tool call (server/forced_calls.new_call) as a function_call item."""
    return {"id": "fc_" + call["id"].removeprefix("call_"), "type": "function_call",
            "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": status}


# ---------------------------------------------------------------- streamed


class _Events:
    """The SSE events of one streamed response, numbered in order (sequence_number)."""

    def __init__(self):
        self.num_sent = 0

    def __call__(self, kind: str, **fields) -> bytes:
        body = {"type": kind, "sequence_number": self.num_sent, **fields}
        self.num_sent += 1
        return b"event: " + kind.encode() + b"\n" + sse(body)


async def response_events(call: ResponsesCall, group):
    """The events of `call`, its request already submitted to `group`: the chat stream's
    chunks (server/sse_stream.chat_chunks) as output item events. Text goes out as it comes;
    tool calls, which the chat stream may send a piece at a time, are put together and go out
    whole at the end."""
    event = _Events()
    opening = call.response("in_progress")
    yield event("response.created", response=opening) + event("response.in_progress",
                                                              response=opening)
    message_id = message_item(call.id, "", "in_progress")["id"]
    reasoning_id = reasoning_item(call.id, "", "in_progress")["id"]
    text, calls, reasoning, finish_reason, usage = [], _Calls(), [], None, None
    reasoning_done = False  # its item's closing events went out (the text that follows it began)
    try:
        async for batch in chat_chunks(call, group, include_usage=True):
            pieces = []
            for chunk in batch:
                if not chunk["choices"]:  # the closing usage chunk
                    usage = chunk["usage"]
                    continue
                [choice] = chunk["choices"]
                delta = choice["delta"]
                if delta.get("reasoning"):  # --reasoning-parser: item 0, before any text
                    if not reasoning:
                        pieces += _open_reasoning(event, call.id)
                    reasoning.append(delta["reasoning"])
                    pieces.append(event("response.reasoning_text.delta", item_id=reasoning_id,
                                        output_index=0, content_index=0,
                                        delta=delta["reasoning"]))
                if (delta.get("content") or delta.get("tool_calls")) and reasoning \
                        and not reasoning_done:
                    pieces += _close_reasoning(event, call.id, "".join(reasoning), "completed")
                    reasoning_done = True
                if delta.get("content"):
                    if not text:
                        pieces += _open_message(event, call.id, int(bool(reasoning)))
                    text.append(delta["content"])
                    pieces.append(event("response.output_text.delta", item_id=message_id,
                                        output_index=int(bool(reasoning)), content_index=0,
                                        delta=delta["content"], logprobs=[]))
                for entry in delta.get("tool_calls") or ():
                    calls.add(entry)
                finish_reason = choice["finish_reason"] or finish_reason
            if pieces:
                yield b"".join(pieces)
    except EngineFault as e:
        yield event("error", code="server_error", message=str(e), param=None)
        return
    response = call.finished("".join(text), calls.whole(), finish_reason, usage,
                             "".join(reasoning) or None)
    yield b"".join(_closing(event, response, opened=bool(text), reasoning_done=reasoning_done))


class _Calls:
    """The tool calls of a streamed chat choice, put together from its delta.tool_calls
    entries: a call's first entry carries its id and name, the next ones more arguments."""

    def __init__(self):
        self.calls: list[dict] = []
        self.arguments: list[list[str]] = []  # each call's arguments, in pieces

    def add(self, entry: dict) -> None:
        if entry["index"] == len(self.calls):
            self.calls.append({"id": entry["id"], "type": entry["type"],
                               "function": {"name": entry["function"]["name"]}})
            self.arguments.append([])
        self.arguments[entry["index"]].append(entry["function"]["arguments"])

    def whole(self) -> list[dict]:
        return [{**call, "function": {**call["function"], "arguments": "".join(pieces)}}
                for call, pieces in zip(self.calls, self.arguments, strict=True)]


def _open_reasoning(event: _Events, response_id: str) -> list[bytes]:
    item = {**reasoning_item(response_id, "", "in_progress"), "content": []}
    return [event("response.output_item.added", output_index=0, item=item),
            event("response.content_part.added", item_id=item["id"], output_index=0,
                  content_index=0, part=reasoning_text(""))]


def _close_reasoning(event: _Events, response_id: str, text: str, status: str) -> list[bytes]:
    item = reasoning_item(response_id, text, status)
    at = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    return [event("response.reasoning_text.done", **at, text=text),
            event("response.content_part.done", **at, part=reasoning_text(text)),
            event("response.output_item.done", output_index=0, item=item)]


def _open_message(event: _Events, response_id: str, index: int) -> list[bytes]:
    item = {**message_item(response_id, "", "in_progress"), "content": []}
    return [event("response.output_item.added", output_index=index, item=item),
            event("response.content_part.added", item_id=item["id"], output_index=index,
                  content_index=0, part=output_text(""))]


def _closing(event: _Events, response: dict, opened: bool, reasoning_done: bool
             ) -> list[bytes]:
    """The events that end each output item of the finished `response` not ended yet, then the
    response."""
    pieces = []
    for index, item in enumerate(response["output"]):
        at = {"item_id": item["id"], "output_index": index}
        if item["type"] == "reasoning":  # first, and ended once the text after it began
            if not reasoning_done:
                pieces += _close_reasoning(event, response["id"], item["content"][0]["text"],
                                           item["status"])
            continue
        if item["type"] == "message":  # the text comes before any call
            if not opened:  # no text came: an empty message, as the whole answer has it
                pieces += _open_message(event, response["id"], index)
            [part] = item["content"]
            pieces += [event("response.output_text.done", **at, content_index=0,
                             text=part["text"], logprobs=[]),
                       event("response.content_part.done", **at, content_index=0, part=part)]
        else:
            pieces += [event("response.output_item.added", output_index=index,
                             item={**item, "arguments": "", "status": "in_progress"}),
                       event("response.function_call_arguments.delta", **at,
                             delta=item["arguments"]),
                       event("response.function_call_arguments.done", **at, name=item["name"],
                             arguments=item["arguments"])]
        pieces.append(event("response.output_item.done", output_index=index, item=item))
    kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
    pieces.append(event(kind, response=response))
    return pieces
