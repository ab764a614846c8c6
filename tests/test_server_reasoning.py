"""--reasoning-parser through the server with the `openai` SDK: the tiny model's answers are
made to hold <think> blocks by a regex (structured outputs), or are all reasoning where the
block is open from the start (deepseek_r1); whole and streamed answers split the same way."""

import json
import re

import pytest

pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from test_server import MODEL, Server, _make_core, sdk_client  # noqa: E402

from server.app import create_app  # noqa: E402

CHAT = [{"role": "user", "content": "Think first."}]
THINKING = r"<think>[a-z]{3,8}( [a-z]{3,8}){2,5}</think>[A-Z][a-z]{3,8}( [a-z]{3,8}){2,4}\."
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALLING = (r'<think>[a-z]{3,8}( [a-z]{3,8}){1,3}</think><tool_call>\{"name": "get_weather", '
           r'"arguments": \{"city": "[A-Z][a-z]{2,8}"\}\}</tool_call>')


@pytest.fixture(scope="module")
def server():
    with Server(create_app(served_model_name=MODEL, make_core=_make_core,
                           reasoning_parser="qwen3")) as s:
        yield s


@pytest.fixture
def client(server):
    return sdk_client(server)


@pytest.fixture
def parser_kind(server):
    """Switch the server's parser for one test (it is read per call)."""
    settings = server.app.state.settings

    def use(kind):
        settings.reasoning_parser = kind

    yield use
    settings.reasoning_parser = "qwen3"


def ask(client, regex=None, **kw):
    extra = {"structured_outputs": {"regex": regex}} if regex else {}
    extra.update(kw.pop("extra_body", {}))
    kw = {"max_tokens": 80, "temperature": 1.0, "seed": 0, **kw}
    return client.chat.completions.create(model=MODEL, messages=CHAT, extra_body=extra, **kw)


def streamed(chunks) -> dict:
    out = {"reasoning": "", "reasoning_content": "", "content": "", "tool_calls": [],
           "finish_reason": None}
    for chunk in chunks:
        for c in chunk.choices:
            d = c.delta.model_dump()
            for key in ("reasoning", "reasoning_content", "content"):
                out[key] += d.get(key) or ""
            out["tool_calls"] += d.get("tool_calls") or []
            out["finish_reason"] = c.finish_reason or out["finish_reason"]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_think_block_is_reasoning_whole_and_streamed(client, seed):
    whole = ask(client, THINKING, seed=seed).choices[0]
    text = whole.message.content
    reasoning = whole.message.model_dump()["reasoning"]
    assert reasoning and re.fullmatch(r"[a-z ]+", reasoning) and " " in reasoning
    assert re.fullmatch(r"[A-Z][a-z ]+\.", text)
    assert whole.message.model_dump()["reasoning_content"] == reasoning
    parts = streamed(ask(client, THINKING, seed=seed, stream=True))
    assert (parts["reasoning"], parts["content"]) == (reasoning, text)
    assert parts["reasoning_content"] == reasoning and parts["finish_reason"] == "stop"


def test_include_reasoning_false_drops_it(client):
    whole = ask(client, THINKING, extra_body={"include_reasoning": False}).choices[0]
    assert "reasoning" not in whole.message.model_dump(exclude_unset=True)
    assert re.fullmatch(r"[A-Z][a-z ]+\.", whole.message.content)
    parts = streamed(ask(client, THINKING, stream=True,
                         extra_body={"include_reasoning": False}))
    assert parts["reasoning"] == "" and parts["content"] == whole.message.content


def test_tool_calls_are_read_from_the_content(client):
    kw = dict(tools=[TOOL], extra_body={"structured_outputs": {"regex": CALLING}})
    whole = ask(client, **kw).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    [call] = whole.message.tool_calls
    assert call.function.name == "get_weather"
    assert re.fullmatch(r"[A-Z][a-z]+", json.loads(call.function.arguments)["city"])
    assert re.fullmatch(r"[a-z ]+", whole.message.model_dump()["reasoning"])
    parts = streamed(ask(client, stream=True, **kw))
    assert parts["finish_reason"] == "tool_calls" and parts["content"] == ""
    assert parts["reasoning"] == whole.message.model_dump()["reasoning"]
    assert [t["function"]["arguments"] for t in parts["tool_calls"]] == [call.function.arguments]


def test_deepseek_r1_answers_start_inside_the_block(client, parser_kind):
    free = ask(client, max_tokens=12).choices[0]  # qwen3: no tag, so all content
    assert free.message.content and free.message.model_dump().get("reasoning") is None
    parser_kind("deepseek_r1")
    whole = ask(client, max_tokens=12).choices[0]
    assert whole.message.content is None
    assert whole.message.model_dump()["reasoning"] == free.message.content
    parts = streamed(ask(client, max_tokens=12, stream=True))
    assert parts["reasoning"] == free.message.content and parts["content"] == ""
    # a grammar holds only after the block, which this model never closes: all reasoning,
    # free text (qwen3, whose answers start outside the block, holds it from the first token)
    whole = ask(client, r"[a-z]{3,8}( [a-z]{3,8}){2}", max_tokens=12).choices[0]
    assert whole.message.content is None and whole.finish_reason == "length"
    assert not re.fullmatch(r"[a-z ]+", whole.message.model_dump()["reasoning"])
    parser_kind("qwen3")
    whole = ask(client, r"[a-z]{3,8}( [a-z]{3,8}){2}", max_tokens=12).choices[0]
    assert re.fullmatch(r"[a-z ]+", whole.message.content)


def test_without_a_parser_the_tags_stay_in_the_content(client, parser_kind):
    parser_kind(None)
    whole = ask(client, THINKING).choices[0]
    assert whole.message.content.startswith("<think>") and "</think>" in whole.message.content
    assert whole.message.model_dump().get("reasoning") is None


def test_the_flag_is_checked_by_name():
    from server.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "--reasoning-parser", "deepseek_r1"])
    assert args.reasoning_parser == "deepseek_r1"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--reasoning-parser", "granite"])


# ---------------------------------------------------------------- the Responses API


def test_responses_carry_the_reasoning_as_an_item(server, client, parser_kind):
    from test_responses import as_input, raw_events, valid_response

    parser_kind("deepseek_r1")  # the free answer is all reasoning: the block is never closed
    body = {"model": MODEL, "input": "Think.", "max_output_tokens": 8, "temperature": 0}
    whole = valid_response(httpx.post(server.url + "/v1/responses", json=body,
                                      timeout=60).json())
    [item] = whole.output
    assert item.type == "reasoning" and item.id.startswith("rs_") and whole.status == "incomplete"
    text = item.content[0].text
    assert text and item.content[0].type == "reasoning_text" and item.status == "incomplete"
    assert whole.output_text == ""
    assert 0 < whole.usage.output_tokens_details.reasoning_tokens <= whole.usage.output_tokens + 1
    events = raw_events(server.url, body)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") \
        == text
    assert kinds[-4:] == ["response.reasoning_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert valid_response(events[-1]["response"]).output[0].content[0].text == text
    # stored and continued: the reasoning goes back into the chat as the assistant's turn
    r = client.responses.create(model=MODEL, input="Think.", max_output_tokens=8, temperature=0)
    nxt = client.responses.create(model=MODEL, previous_response_id=r.id, input="More.",
                                  max_output_tokens=4, temperature=0)
    sent = client.responses.create(model=MODEL, input=[{"role": "user", "content": "Think."},
                                                       *as_input(r.output),
                                                       {"role": "user", "content": "More."}],
                                   max_output_tokens=4, temperature=0)
    assert nxt.usage.input_tokens == sent.usage.input_tokens
    assert nxt.output[0].content[0].text == sent.output[0].content[0].text


def test_a_streamed_response_closes_its_reasoning_before_its_text(monkeypatch):
    """Driven by chat chunks of reasoning, then text, then a tool call: the reasoning item
    (output 0) ends before the message (output 1) opens; every event is the SDK's type."""
    import asyncio
    import types

    from test_responses import STREAM_EVENT, valid_response

    from server import responses

    def chunk(delta=None, finish=None, usage=None):
        if usage is not None:
            return {"choices": [], "usage": usage}
        return {"choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}

    call_ = {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14,
             "prompt_tokens_details": {"cached_tokens": 0, "created_cache_tokens": 0}}

    async def chat_chunks(call, group, include_usage):
        yield [chunk({"reasoning": "think "}), chunk({"reasoning": "hard"})]
        yield [chunk({"content": "Sun"}), chunk({"content": "ny."})]
        yield [chunk({"tool_calls": [{"index": 0, **call_}]}), chunk(finish="tool_calls")]
        yield [chunk(usage=usage)]

    monkeypatch.setattr(responses, "chat_chunks", chat_chunks)
    call = object.__new__(responses.ResponsesCall)
    call.id, call.model, call.created, call.store, call.messages = "resp_x", MODEL, 0, None, []
    call.params = types.SimpleNamespace(temperature=1.0, top_p=1.0)
    call.asked = types.SimpleNamespace(body={}, tools=[], tool_choice="auto",
                                       text_format={"type": "text"}, metadata=None,
                                       previous_response_id=None, store=False)
    from conftest import _smollm2_tokenizer

    call.engine = types.SimpleNamespace(tokenizer=_smollm2_tokenizer())

    async def collect():
        return [piece async for piece in responses.response_events(call, None)]

    raw = b"".join(asyncio.run(collect())).decode()
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]
    for event in events:
        STREAM_EVENT.validate_python(event, strict=True)
    where = [(e["type"], e.get("output_index")) for e in events]
    done_reasoning = where.index(("response.output_item.done", 0))
    assert done_reasoning < where.index(("response.output_item.added", 1))
    assert ("response.output_text.delta", 1) in where and ("response.output_item.done", 2) in where
    final = valid_response(events[-1]["response"])
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call"]
    assert final.output[0].content[0].text == "think hard"
    assert final.output[1].content[0].text == "Sunny."
    assert final.usage.output_tokens_details.reasoning_tokens == 2
    # cut at max_tokens after the reasoning: the reasoning is complete, the message is not
    cut = valid_response(call.finished("Sun", [], "length", usage, "think hard"))
    assert [o.status for o in cut.output] == ["completed", "incomplete"]


def test_the_batch_route_splits_each_conversation(server):
    body = {"model": MODEL, "messages": [CHAT, [{"role": "user", "content": "Again."}]],
            "max_tokens": 80, "temperature": 1.0, "seed": 3,
            "structured_outputs": {"regex": THINKING}}
    answer = httpx.post(server.url + "/v1/chat/completions/batch", json=body, timeout=60).json()
    for choice in answer["choices"]:
        message = choice["message"]
        assert re.fullmatch(r"[a-z ]+", message["reasoning"])
        assert re.fullmatch(r"[A-Z][a-z ]+\.", message["content"])


def test_reasoning_input_items_join_the_assistant_turn_after_them():
    from server.responses_request import _read_input, conversation

    items = _read_input([
        {"role": "user", "content": "Hi"},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text",
                                                          "text": "plan"}]},
        {"role": "assistant", "content": "Hello"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "call it"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "1"},
        {"type": "reasoning", "summary": []},
    ])
    assert conversation([], items) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning": "plan"},
        {"role": "assistant", "content": None, "reasoning": "call it", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "1"},
    ]  # the last, empty reasoning item adds no turn
