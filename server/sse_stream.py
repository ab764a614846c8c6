"""The streamed answer of a generation call (server/generation_call.py): its outputs as SSE
chunks, and the response that closes the call's RequestGroup however the stream ends.
"""

from __future__ import annotations

import json

import msgspec
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse

from server.async_engine import EngineFault
from server.protocol import APIError, chat_body, completion_body
from server.reasoning import ReasoningStream, reasoning_delta
from server.timeline import FIRST_CHUNK
from server.tool_calls import ToolCallStream


async def events(call, group, include_usage: bool):
    """The SSE chunks of `call` (a GenerationCall), its requests already submitted to `group`."""
    try:
        async for batch in chat_chunks(call, group, include_usage):
            yield b"".join(map(sse, batch))
    except EngineFault as e:
        error = APIError(500, str(e), type="server_error")
        yield sse(json.loads(error.response().body))
    yield DONE


async def chat_chunks(call, group, include_usage: bool):
    """The chunks of `call`, its requests already submitted to `group`, as lists of JSON bodies:
    each list is one write (a stream that fell behind the engine catches up in one send instead
    of one per step), and the generator resumes once it is written. An engine fault is raised
    once the group is closed."""
    build = chat_body if call.chat else completion_body
    continuous = include_usage and call.extras.continuous_usage
    num_generated = 0
    # continuous usage, as vLLM counts it: each chunk carries its own choice's prompt and
    # tokens so far (per_choice); only the last, choice-less chunk sums the whole call (and its
    # per-request timings read the longest choice)
    per_choice: dict[tuple[str, int], int] = {}
    count_choices = continuous or (include_usage and call.per_request_metrics)
    current: list[dict] = [call.usage(0)]  # the usage of the choice being written
    sent_prompt_ids = []
    choice_readers: dict[int, _Readers] = {}  # choice index -> its readers

    def chunk(choices, use=None, metrics=None):
        if continuous and use is None:
            use = current[0]
        body = build(call.id, call.model, choices, use, call.created, chunk=True)
        if include_usage:  # OpenAI: "all other chunks will also include a usage field, null"
            body.setdefault("usage", None)
        if metrics is not None:  # the closing usage chunk: vLLM's per-request timings
            body["metrics"] = metrics
        if call.chat and call.extras.return_token_ids and not sent_prompt_ids:
            body["prompt_token_ids"] = call.token_lists[0]  # the first chunk only
            sent_prompt_ids.append(True)
        return body

    async with group:
        if call.chat:  # the opening chunk of every choice, in one write
            options = call.chat_options
            opening = []
            for index in range(len(call.index_of) * call.params.n):
                delta = {"role": options.role, "content": ""}
                opening.append(chunk([{"index": index, "delta": delta, "logprobs": None,
                                       "finish_reason": None}]))
                if options.echo:
                    opening.append(chunk([{"index": index, "delta": {"content": options.echo},
                                           "logprobs": None, "finish_reason": None}]))
            yield opening
        opened = set()  # completions: the choices whose first chunk went out
        closed = set()  # the choices whose last chunk (finish_reason) went out
        async for batch in group.batches():
            pieces, firsts = [], []
            for out in batch:
                if out.request_id not in call.first:
                    firsts.append(out.request_id)
                call.first.setdefault(out.request_id, out)
                for c in out.outputs:
                    key = (out.request_id, c.index)
                    if not call.extras.score_only:  # before its chunk: continuous usage
                        num_generated += len(c.delta_token_ids)
                        if count_choices:
                            per_choice[key] = per_choice.get(key, 0) + len(c.delta_token_ids)
                    if continuous:
                        current[0] = call.choice_usage(out.request_id,
                                                       per_choice.get(key, 0))
                    if key in closed:
                        # n > 1: a request's output lists every choice each step, the
                        # finished ones too; theirs went out once already
                        continue
                    if c.finished():
                        closed.add(key)
                    pieces += _choice_chunks(call, chunk, opened, choice_readers, out, c)
            if pieces:
                yield pieces
            for request_id in firsts:  # its chunks are written: send() returned
                group.engine.timeline.stamp(request_id, FIRST_CHUNK)
    if include_usage:
        yield [chunk([], call.usage(num_generated),
                     call.request_metrics(num_generated, max(per_choice.values(), default=0)))]


def _choice_chunks(call, chunk, opened: set, choice_readers: dict, out, c) -> list[dict]:
    """The SSE chunks for one step of choice `c` of `out` (none for a step with nothing new)."""
    pieces = []
    first = not call.chat and (out.request_id, c.index) not in opened
    if first:
        opened.add((out.request_id, c.index))
        if call.echo:
            pieces.append(chunk([_opening(call, out.request_id, c.index)]))
    if not c.delta_text and not c.delta_token_ids and not c.finished():
        return pieces
    choice = call.choice(out.request_id, c, whole=False)
    if call.extras.score_only and not c.finished():
        return pieces
    if first and call.extras.return_token_ids and not call.echo:
        choice["prompt_token_ids"] = call.token_lists[call.index_of[out.request_id]]
    if call.tool_parser is not None or call.reasoning is not None:
        readers = choice_readers.setdefault(choice["index"], _Readers(call))
        return pieces + [chunk([held]) for held in _held_chunks(call, readers, choice, c)]
    if not c.delta_text and not c.finished() and choice["logprobs"] is None \
            and "token_ids" not in choice and call.engine.tokenizer is not None:
        # tokens whose text is held back (a stop string may start there, a character's bytes
        # may be incomplete): no news. A model without a tokenizer writes no text at all, and
        # each of its steps is a chunk.
        return pieces
    pieces.append(chunk([choice]))  # a last one carries its text and finish_reason
    return pieces


def _opening(call, request_id: str, index: int) -> dict:
    """An echoing completions choice's first chunk: the prompt (scored when logprobs are
    asked), and its ids when return_token_ids is set."""
    i = call.index_of[request_id]
    choice = {"index": call.choice_index(request_id, index), "text": call.echo[i],
              "logprobs": None, "finish_reason": None}
    if call.params.logprobs is not None:
        choice["logprobs"] = call.echo_logprobs(request_id)
    if call.extras.return_token_ids:
        choice["prompt_token_ids"] = call.token_lists[i]
        choice["token_ids"] = []
    return choice


class _Readers:
    """A streamed chat choice's readers: its reasoning (--reasoning-parser) first, then its tool
    calls (tools), each holding back what may still turn out to be its tag."""

    def __init__(self, call):
        self.reasoning = None if call.reasoning is None else ReasoningStream(call.reasoning)
        self.tools = None if call.tool_parser is None else ToolCallStream(call.tool_parser)
        self.include_reasoning = call.extras.include_reasoning

    def feed(self, text: str, finished: bool) -> tuple[list[dict], bool]:
        """(deltas to send now, whether the output was whole tool calls: known once it
        finished)."""
        parts = [("content", text)] if self.reasoning is None else self.reasoning.feed(text)
        if finished and self.reasoning is not None:
            parts += self.reasoning.finish()
        deltas = []
        for kind, piece in parts:
            if kind == "reasoning":
                if self.include_reasoning:
                    deltas.append(reasoning_delta(piece))
            elif self.tools is not None:
                deltas += self.tools.feed(piece)
            else:
                deltas.append({"content": piece})
        whole_calls = False
        if finished and self.tools is not None:
            last, whole_calls = self.tools.finish()
            deltas += last
        return deltas, whole_calls


def _held_chunks(call, readers: _Readers, choice: dict, c) -> list[dict]:
    """The streamed choices for one step of a choice whose text is read for reasoning or tool
    calls."""
    index = choice["index"]
    deltas, whole_calls = readers.feed(c.delta_text, c.finished())
    finish_reason = None
    if c.finished():
        finish_reason = c.finish_reason if call.tool_parser is None \
            else call.tool_parser.finish_reason(c.finish_reason, whole_calls)
    out = [{"index": index, "delta": d, "logprobs": None, "finish_reason": None}
           for d in deltas]
    if choice["logprobs"] is not None or choice.get("token_ids"):
        # every token's logprobs (and id, with return_token_ids) go out as it comes, also while
        # its text is held back (a call may be starting), as OpenAI streams them: with an empty
        # delta then
        if not out:
            out.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": None})
        out[0]["logprobs"] = choice["logprobs"]
        if "token_ids" in choice:
            out[0]["token_ids"] = choice["token_ids"]
    if c.finished():
        out.append({"index": index, "delta": {}, "logprobs": None,
                    "finish_reason": finish_reason, "stop_reason": c.stop_reason})
    return out


DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.Encoder().encode  # compact JSON as UTF-8, ~7x json.dumps on a chunk


def sse(obj: dict) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


class SSEResponse(StreamingResponse):
    """An SSE stream that owns the call's RequestGroup from its submission: however the response
    ends (done, client gone before the first chunk or mid-stream, error) the group is closed, so
    its unfinished requests are aborted at once. Closing the generator alone would not do: a
    client gone before the first chunk leaves it unstarted, and closing it then runs nothing."""

    on_close = None  # called once the stream ends, however it ends (handlers.load_tracked)

    def __init__(self, group, events):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.group = group

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except (OSError, ClientDisconnect):
            pass  # the client went away
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self.group.close()
                if self.on_close is not None:
                    self.on_close()
