"""Structured outputs and tool calling through the server with the `openai` SDK (tiny random model
with the real SmolLM2 vocabulary: its free output is noise, so only the grammar makes it parse)."""

import json
import re

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from test_server import MODEL, Server, _make_core, sdk_client  # noqa: E402

from engine.model.chat_template import template_messages  # noqa: E402
from server.app import create_app  # noqa: E402
from server.tool_calls import ToolCallParser, ToolCallStream  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 14},
                   "stops": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                        "maximum": 9}, "maxItems": 3}},
    "required": ["city", "days", "stops"],
    "additionalProperties": False,
}
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12,
                                                  "maximum": 12}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
CHAT = [{"role": "user", "content": "Plan a trip."}]


@pytest.fixture(scope="module")
def server():
    with Server(create_app(served_model_name=MODEL, make_core=_make_core)) as s:
        yield s


@pytest.fixture
def client(server):
    return sdk_client(server)


def _streamed(chunks) -> dict[int, dict]:
    """choice index -> {"content", "tool_calls", "finish_reason"} put together from SSE chunks;
    each call's deltas joined: its first one carries its id, type and name (once), the next
    ones only more arguments."""
    out: dict[int, dict] = {}
    for chunk in chunks:
        for c in chunk.choices:
            o = out.setdefault(c.index, {"content": "", "tool_calls": [], "finish_reason": None})
            o["content"] += c.delta.content or ""
            for entry in c.delta.tool_calls or ():
                calls = o["tool_calls"]
                if entry.index == len(calls):
                    assert entry.id and entry.type == "function" and entry.function.name
                    calls.append(entry)
                else:
                    assert entry.index == len(calls) - 1, "a call's deltas come together"
                    assert entry.id is None and entry.function.name is None
                    calls[-1].function.arguments += entry.function.arguments
            o["finish_reason"] = c.finish_reason or o["finish_reason"]
    return out


def test_json_schema_response_format_chat_and_completions(server, client):
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA,
                                                  "strict": True}}
    before = server.metric("pagedserve_structured_output_requests_total")
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, n=16, temperature=1.0,
                                           seed=1, max_tokens=60, response_format=fmt)
    for choice in whole.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    streamed = _streamed(client.chat.completions.create(
        model=MODEL, messages=CHAT, n=4, temperature=1.0, seed=2, max_tokens=60,
        response_format=fmt, stream=True))
    assert len(streamed) == 4
    for o in streamed.values():
        jsonschema.validate(json.loads(o["content"]), SCHEMA)
    # vLLM's field on completions, whole and streamed.
    for stream in (False, True):
        out = client.completions.create(model=MODEL, prompt="Code:", n=8, temperature=1.0,
                                        max_tokens=20, stream=stream,
                                        extra_body={"structured_outputs":
                                                    {"regex": "[A-Z]{2}-[0-9]{3}"}})
        texts = {}
        for chunk in (out if stream else [out]):
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
        assert len(texts) == 8 and all(re.fullmatch("[A-Z]{2}-[0-9]{3}", t)
                                       for t in texts.values()), texts
    assert server.metric("pagedserve_structured_output_requests_total") == before + 4
    assert server.metric("pagedserve_grammar_compile_seconds_count") >= 2
    server.wait_idle()


def test_required_and_named_tool_calls(server, client):
    schemas = {"get_weather": WEATHER, "get_time": TIME}
    out = client.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, n=8,
                                         tool_choice="required", temperature=1.0, seed=3,
                                         max_tokens=80, parallel_tool_calls=False)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls", choice
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    named = {"type": "function", "function": {"name": "get_time"}}
    out = client.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, n=4,
                                         tool_choice=named, temperature=1.0, max_tokens=40)
    for choice in out.choices:
        [call] = choice.message.tool_calls
        # a named tool's call ends with "stop", as OpenAI's (required: "tool_calls")
        assert call.function.name == "get_time" and choice.finish_reason == "stop"
        jsonschema.validate(json.loads(call.function.arguments), TIME)
    streamed = _streamed(client.chat.completions.create(
        model=MODEL, messages=CHAT, tools=TOOLS, tool_choice=named, temperature=1.0,
        max_tokens=40, stream=True))
    [o] = streamed.values()
    [call] = o["tool_calls"]
    assert call.function.name == "get_time" and o["finish_reason"] == "stop", o
    streamed = _streamed(client.chat.completions.create(
        model=MODEL, messages=CHAT, tools=TOOLS, tool_choice="required", temperature=1.0,
        max_tokens=80, stream=True, n=2))
    for o in streamed.values():
        assert o["finish_reason"] == "tool_calls" and o["content"] == ""
        for call in o["tool_calls"]:
            jsonschema.validate(json.loads(call.function.arguments),
                                schemas[call.function.name])
    server.wait_idle()


def _raw_stream(server, body: dict) -> tuple[list[dict], list[dict], str]:
    """(the delta.tool_calls entries, the content deltas, the finish_reason) of one streamed
    chat of one choice, as sent."""
    entries, content, finish_reason = [], [], None
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    entries += c["delta"].get("tool_calls") or []
                    content += [c["delta"]["content"]] if c["delta"].get("content") else []
                    finish_reason = c["finish_reason"] or finish_reason
    return entries, content, finish_reason


def _joined(entries: list[dict]) -> list[dict]:
    """The calls streamed entries add up to, each opened once (index, id, type, name), then
    only arguments."""
    calls = []
    for entry in entries:
        if entry["index"] == len(calls):
            assert set(entry) == {"index", "id", "type", "function"}, entry
            calls.append({"id": entry["id"], "type": entry["type"],
                          "function": dict(entry["function"])})
        else:
            assert entry["index"] == len(calls) - 1 and set(entry) == {"index", "function"}
            assert set(entry["function"]) == {"arguments"}
            calls[-1]["function"]["arguments"] += entry["function"]["arguments"]
    return calls


@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"])
def test_forced_calls_stream_a_piece_at_a_time(server, tool_choice):
    """A forced call goes out as it is written: its header once, then its arguments in pieces
    that join to the whole answer's; cut short by max_tokens, both answers hold the call as far
    as it came, with finish_reason "length"."""
    body = {"model": MODEL, "messages": CHAT, "tools": TOOLS, "tool_choice": tool_choice,
            "temperature": 0, "max_tokens": 80}
    full = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    [choice] = full["choices"]
    calls = choice["message"]["tool_calls"]
    assert calls and choice["finish_reason"] == ("stop" if "function" in tool_choice
                                                 else "tool_calls")
    num_tokens = full["usage"]["completion_tokens"]
    entries, content, finish_reason = _raw_stream(server, body)
    streamed = _joined(entries)
    assert [c["function"] for c in streamed] == [c["function"] for c in calls]
    assert finish_reason == choice["finish_reason"] and not content
    assert len(entries) > 2 * len(calls)  # in pieces, not whole at the end
    cut_calls = 0
    cuts = [*range(1, num_tokens - 1, max(1, num_tokens // 8)), num_tokens - 1]
    for max_tokens in cuts:
        cut = {**body, "max_tokens": max_tokens}
        [choice] = httpx.post(server.url + "/v1/chat/completions", json=cut,
                              timeout=60).json()["choices"]
        entries, content, finish_reason = _raw_stream(server, cut)
        got = choice["message"].get("tool_calls") or []
        assert [c["function"] for c in _joined(entries)] == [c["function"] for c in got]
        # the array may be whole before the eos token: "tool_calls" then
        assert finish_reason == choice["finish_reason"] == (
            "tool_calls" if tool_choice == "required" and max_tokens == num_tokens - 1
            else "length")
        if got:
            cut_calls += 1
            assert choice["message"]["content"] is None and not content
            *done, last = got
            assert [c["function"] for c in done] == [c["function"] for c in calls[:len(done)]]
            assert last["function"]["name"] == calls[len(done)]["function"]["name"]
            assert calls[len(done)]["function"]["arguments"].startswith(
                last["function"]["arguments"])
        else:  # no call began: the text is content, whole and streamed
            assert "".join(content) == choice["message"]["content"]
    assert cut_calls >= len(cuts) // 2, (cut_calls, cuts)
    server.wait_idle()



@pytest.mark.parametrize("tool_choice,max_tokens", [
    ("auto", 4), ("required", 3), ({"type": "function", "function": {"name": "get_time"}}, 3),
    ("required", 80)])
def test_a_chat_under_tools_sends_token_ids_null_whatever_it_wrote(server, tool_choice,
                                                                    max_tokens):
    """vLLM's `token_ids` is null when not asked for. Under tools it was left out of the whole
    answer unless the output was whole calls: the read's "whole calls" flag shadowed the
    builder's `whole` (this answer is the whole one), so plain text under "auto" and a call
    cut by max_tokens lost the field."""
    body = {"model": MODEL, "messages": CHAT, "tools": TOOLS, "tool_choice": tool_choice,
            "temperature": 0, "max_tokens": max_tokens}
    [choice] = httpx.post(server.url + "/v1/chat/completions", json=body,
                          timeout=60).json()["choices"]
    assert choice["finish_reason"] == ("tool_calls" if max_tokens == 80 else "length")
    assert "token_ids" in choice and choice["token_ids"] is None
    asked = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={**body, "return_token_ids": True}).json()["choices"][0]
    assert len(asked["token_ids"]) == max_tokens if max_tokens < 80 else asked["token_ids"]


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema",  # was accepted and ignored
                          "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}},
     "response_format"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "start: foo"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters":
                                                  {"type": "objec"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS + TOOLS[:1], "tool_choice": {"type": "function",
                                                  "function": {"name": "get_weather"}}},
     "tools"),  # two functions of one name (it was a 500)
    # Beams each pick from one row's top candidates: no grammar per beam.
    ({"use_beam_search": True, "structured_outputs": {"choice": ["a", "b"]}},
     "structured_outputs"),
    ({"use_beam_search": True, "tools": TOOLS, "tool_choice": "required"}, "tools"),
])
def test_a_bad_schema_or_tool_is_a_400_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": MODEL, "messages": CHAT, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    if '"objec"' in json.dumps(body):
        assert "objec" in r.json()["error"]["message"]  # llguidance's reason reaches the client


@pytest.mark.parametrize("so", [
    {"json": {"$ref": "#"}},
    {"json": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
              "$ref": "#/$defs/a"}},
    {"grammar": "start: x\nx: x"},
])
@pytest.mark.parametrize("stream", [False, True])
def test_a_grammar_that_matches_nothing_is_a_400_naming_the_field(server, so, stream):
    """It compiled, then failed in the core at the first step: a 500 server_error (or an error
    event mid-stream) carrying llguidance's state dump."""
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": CHAT, "max_tokens": 4, "stream": stream,
        "structured_outputs": so})
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == "structured_outputs"
    assert "no output" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": CHAT, "max_tokens": 4, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("params", [
    {"$ref": "#"},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
])
def test_required_tools_whose_arguments_match_nothing_are_a_400_naming_tools(server, params,
                                                                               stream):
    """tool_choice "required": the one grammar of all the calls lets a call begin before its
    arguments, so it compiled and allowed a first token, and the request failed in the core
    once '"arguments": ' was written (a 500, or an error event mid-stream), where the same
    tool named in tool_choice is a 400. So is it beside tools that can be called: it was
    picked too (a 500 whenever it was)."""
    dead = {"type": "function", "function": {"name": "loop", "parameters": params}}
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 30, "stream": stream,
            "tool_choice": "required", "temperature": 1.0}
    for seed in range(3):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={**body, "tools": [dead], "seed": seed})
        assert r.status_code == 400, r.text[:300]
        error = r.json()["error"]
        assert error["param"] == "tools" and "no output" in error["message"], error
        assert "tools[0].function.parameters" in error["message"], error
    r = httpx.post(server.url + "/v1/responses", timeout=60, json={
        "model": MODEL, "input": "Hi", "tools": [{"type": "function", "name": "loop",
                                                  "parameters": params}],
        "tool_choice": "required", "stream": stream})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text[:300]
    assert "tools[0].parameters" in r.json()["error"]["message"]
    for seed in range(3):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            **body, "tools": [*TOOLS, dead], "seed": seed})
        assert r.status_code == 400, r.text[:300]
        assert "tools[2].function.parameters" in r.json()["error"]["message"]
    # the tools that can be called, alone: they run
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        **body, "tools": TOOLS, "stream": False, "parallel_tool_calls": False,
        "max_tokens": 60})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["choices"][0]["message"]["tool_calls"]
    server.wait_idle()


@pytest.mark.parametrize("so", [{"regex": "a{1000000}"}, {"grammar": "start: /a{1000000}/"}])
def test_a_grammar_past_llguidances_lexer_limit_is_a_400_naming_the_field(server, so):
    """Its first mask passed (the check's), and the lexer all copies share went past its limit
    there: every request's own copy failed at its first step, a 500 carrying a state dump."""
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "a", "max_tokens": 4, "structured_outputs": so})
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["param"] == "structured_outputs"
    assert "too large to match: lexer error: too many expressions" in error["message"]
    assert len(error["message"]) < 200


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"structured_outputs": {"choice": ["yes", "no"]}},
     "structured_outputs"),
    ("/v1/completions", {"structured_outputs": {"regex": "[0-9]+"}}, "structured_outputs"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
])
def test_allowed_token_ids_no_grammar_token_is_a_400_naming_them(server, path, body, param,
                                                                   stream):
    """allowed_token_ids none of which the grammar allows first: every logit -inf, the grammar
    refused the sampler's arbitrary pick, and the request was a 500 carrying llguidance's state
    dump. The server stays healthy, and ids in common with the grammar's still run."""
    prompt = {"messages": CHAT} if "chat" in path else {"prompt": "Answer:"}
    r = httpx.post(server.url + path, timeout=60, json={
        "model": MODEL, "max_tokens": 4, "stream": stream, "allowed_token_ids": [5], **prompt,
        **body})
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == "allowed_token_ids", r.text[:300]
    assert param in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200
    ok = httpx.post(server.url + path, timeout=60, json={
        "model": MODEL, "max_tokens": 4, "allowed_token_ids": list(range(2000)), **prompt,
        **body})
    assert ok.status_code == 200, ok.text[:300]


def test_auto_tool_calls_are_parsed_from_hermes_and_llama_forms():
    parser = ToolCallParser("auto", ["get_weather", "get_time"])
    text = ('Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", '
            '"unit": "c"}}\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": '
            '{"zone": 1}}</tool_call>')
    content, calls = parser.parse(text)
    assert content == "Let me look. "  # as it came: what a stream sends before the call
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Rome", "unit": "c"}), ("get_time", {"zone": 1})]
    content, calls = parser.parse('{"name": "get_time", "parameters": {"zone": -3}}; '
                                  '{"name": "get_time", "parameters": {"zone": 2}}')
    assert content is None and [json.loads(c["function"]["arguments"])["zone"]
                                for c in calls] == [-3, 2]
    _, calls = parser.parse('<|python_tag|>{"name": "get_time", "parameters": {"zone": 0}}')
    assert [c["function"]["name"] for c in calls] == ["get_time"]
    for not_a_call in ('{"name": "unknown", "arguments": {}}', "plain words",
                       "<tool_call>{broken</tool_call>"):
        assert parser.parse(not_a_call) == (not_a_call, [])


def test_auto_tool_calls_are_parsed_from_qwen3_coder_blocks():
    schema = {"properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                             "hot": {"type": "boolean"}, "stops": {"type": "array"},
                             "note": {"type": ["string", "null"]}}}
    parser = ToolCallParser("auto", ["plan", "get_time"], schemas={"plan": schema})
    text = ("I will plan it.\n<tool_call>\n<function=plan>\n<parameter=city>\nNew York\n"
            "</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=hot>\nfalse\n"
            "</parameter>\n<parameter=stops>\n[1, 2]\n</parameter>\n<parameter=note>\n"
            "two\nlines\n</parameter>\n<parameter=extra>\n7\n</parameter>\n</function>\n"
            "</tool_call>\n<tool_call>\n<function=get_time>\n</function>\n</tool_call>")
    content, calls = parser.parse(text)
    assert content == "I will plan it.\n"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("plan", {"city": "New York", "days": 3, "hot": False, "stops": [1, 2],
                  "note": "two\nlines", "extra": "7"}),  # no schema for extra: text
        ("get_time", {})]
    # a value its type does not parse stays text; an unknown function or stray text is no call
    _, [call] = parser.parse("<tool_call><function=plan><parameter=days>three</parameter>"
                             "</function></tool_call>")
    assert json.loads(call["function"]["arguments"]) == {"days": "three"}
    # NaN is no JSON number: it stays text; a schema whose properties are no object types nothing
    _, [call] = parser.parse("<tool_call><function=plan><parameter=days>NaN</parameter>"
                             "</function></tool_call>")
    assert json.loads(call["function"]["arguments"]) == {"days": "NaN"}
    odd = ToolCallParser("auto", ["plan"], schemas={"plan": {"properties": ["days"]}})
    _, [call] = odd.parse("<tool_call><function=plan><parameter=days>3</parameter>"
                          "</function></tool_call>")
    assert json.loads(call["function"]["arguments"]) == {"days": "3"}
    for not_a_call in ("<tool_call><function=nope></function></tool_call>",
                       "<tool_call><function=plan>stray<parameter=days>3</parameter>"
                       "</function></tool_call>"):
        assert parser.parse(not_a_call) == (not_a_call, [])


def test_auto_tool_calls_are_parsed_from_mistral_forms():
    parser = ToolCallParser("auto", ["get_weather", "get_time"])
    array = ('[{"name": "get_weather", "arguments": {"city": "Rome", "unit": "c"}}, '
             '{"name": "get_time", "arguments": {"zone": 1}}]')
    for text, want_content in [("[TOOL_CALLS]" + array, None), (" " + array + "\n", None),
                               ("Checking. [TOOL_CALLS]" + array, "Checking. ")]:
        content, calls = parser.parse(text)
        assert content == want_content
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                for c in calls] == [("get_weather", {"city": "Rome", "unit": "c"}),
                                    ("get_time", {"zone": 1})]
    for not_a_call in ("[1, 2]", "[]", '[{"name": "unknown", "arguments": {}}]',
                       '[TOOL_CALLS][{"name": "get_time", "arguments": {}}, 3]',
                       "[a link](http://x)"):
        assert parser.parse(not_a_call) == (not_a_call, [])
    # streamed: content goes out until the tag, then the calls come whole at the end
    stream = ToolCallStream(parser)
    sent = []
    for piece in ["Checking", ". [TOOL", "_CALLS][", array[1:]]:
        sent += stream.feed(piece)
    assert "".join(d["content"] for d in sent) == "Checking. "
    last, is_call = stream.finish()
    assert is_call and [c["function"]["name"] for c in last[-1]["tool_calls"]] == \
        ["get_weather", "get_time"]
    # an answer that opens with "[" is held only until it cannot be calls, then streams
    plain = ToolCallStream(parser)
    assert plain.feed("[") == [] and plain.feed("a link]") == [{"content": "[a link]"}]
    assert plain.feed("(http://x)") == [{"content": "(http://x)"}]
    assert plain.finish() == ([], False)
    held = ToolCallStream(parser)  # an array of objects may be calls: held to the end
    assert held.feed("[") == [] and held.feed(' {"a": 1}]') == []
    assert held.finish() == ([{"content": '[ {"a": 1}]'}], False)


def test_streamed_auto_output_sends_content_then_holds_a_call():
    stream = ToolCallStream(ToolCallParser("auto", ["get_time"]))
    sent = []
    for piece in ["Sure", ", one", " moment <tool", '_call>{"name": "get_time", ',
                  '"arguments": {"zone": 3}}</tool_call>']:
        sent += stream.feed(piece)
    assert "".join(d["content"] for d in sent) == "Sure, one moment "
    last, is_call = stream.finish()
    assert is_call and last[-1]["tool_calls"][0]["function"]["name"] == "get_time"
    plain = ToolCallStream(ToolCallParser("auto", ["get_time"]))
    deltas = plain.feed("no tools <tool") + plain.feed(" here")
    deltas += plain.finish()[0]
    assert "".join(d["content"] for d in deltas) == "no tools <tool here"


@pytest.mark.parametrize("pieces", [
    ["  Sure thing.", " Calling now.", '<tool_call>{"name": "f", "arguments": {}}</tool_call>'],
    ["  ab", 'c<tool_call>{"name": "f", "arguments": {}}</tool_call>'],
    ["Sure ", '<tool_call>{"name": "f", "arguments": {}}</tool_call>'],
    ["   ", '<tool_call>{"name": "f", "arguments": {}}</tool_call>'],
])
def test_a_streamed_call_keeps_the_content_the_whole_answer_has(pieces):
    """The content before a call, streamed then finished, is the whole answer's content (a
    character had been lost where the whole answer stripped it and the stream did not)."""
    parser = ToolCallParser("auto", ["f"])
    stream = ToolCallStream(parser)
    deltas = [d for piece in pieces for d in stream.feed(piece)]
    last, is_call = stream.finish()
    deltas += last
    content, calls = parser.parse("".join(pieces))
    assert is_call and len(calls) == 1
    assert "".join(d.get("content", "") for d in deltas) == (content or "")


def test_tool_parsing_survives_any_json_and_keeps_one_call_when_not_parallel():
    """A call's name is the model's text: a list there is no call (it was a 500); with
    parallel_tool_calls false only the first call counts."""
    parser = ToolCallParser("auto", ["f", "g"])
    odd = '<tool_call>{"name": ["f"], "arguments": {}}</tool_call>'
    assert parser.parse(odd) == (odd, [])
    two = ('<tool_call>{"name": "f", "arguments": {}}</tool_call>'
           '<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    assert len(parser.parse(two)[1]) == 2
    _, calls = ToolCallParser("auto", ["f", "g"], parallel=False).parse(two)
    assert [c["function"]["name"] for c in calls] == ["f"]


def test_tool_call_forms_at_their_edges():
    """Whitespace alone before a Hermes call is no content; arguments a model wrote as JSON
    text pass as they are (other text as a JSON string, as vLLM's); a required call's output
    that is JSON but no list of calls is text; a stream holds back every proper prefix of an
    opening tag."""
    parser = ToolCallParser("auto", ["f"])
    content, calls = parser.parse(' \n<tool_call>{"name": "f", "arguments": {}}</tool_call>')
    assert content is None and len(calls) == 1
    _, [call] = parser.parse('{"name": "f", "arguments": "{\\"x\\": 1}"}')
    assert call["function"]["arguments"] == '{"x": 1}'
    for text in ("oops", "[1]", '{"x": 1'):  # other text: a JSON string, arguments stay JSON
        _, [call] = parser.parse(json.dumps({"name": "f", "arguments": text}))
        assert call["function"]["arguments"] == json.dumps(text)
    for odd in ("[1]", "5", '[{"name": "g"}]', '[{"arguments": {}}]'):
        assert ToolCallParser("required", ["f"]).parse(odd) == (odd, [])
    # a required call with no arguments written has none, as "auto" reads it
    _, [call] = ToolCallParser("required", ["f"]).parse('[{"name": "f"}]')
    assert call["function"] == {"name": "f", "arguments": "{}"}
    for tag in ("<tool_call>", "<|python_tag|>"):
        stream = ToolCallStream(parser)
        assert stream.feed("ok " + tag[:-1]) == [{"content": "ok "}]


def test_assistant_tool_calls_reach_the_template_as_mappings():
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_time", "arguments": '{"zone": 1}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    fixed = template_messages(messages)
    assert fixed[1]["tool_calls"][0]["function"]["arguments"] == {"zone": 1}
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"zone": 1}'  # untouched
    assert fixed[2] == messages[2]


def test_assistant_turns_reach_the_template_as_vllm_hands_them_over():
    """Empty or missing arguments as {}, an empty or null list of calls left out, reasoning under
    both names the templates read."""
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}
    missing = {"id": "d", "type": "function", "function": {"name": "g"}}
    fixed = template_messages([
        {"role": "assistant", "content": "", "tool_calls": [call, missing]},
        {"role": "assistant", "content": "A", "tool_calls": []},
        {"role": "assistant", "content": "B", "reasoning": "R", "tool_calls": None},
        {"role": "assistant", "content": "C", "reasoning_content": "S"},
        {"role": "user", "content": "u", "tool_calls": []}])
    assert [c["function"]["arguments"] for c in fixed[0]["tool_calls"]] == [{}, {}]
    assert "tool_calls" not in fixed[1]
    assert "tool_calls" not in fixed[2]  # null, as message.model_dump() writes a plain turn
    assert fixed[2]["reasoning_content"] == "R" and fixed[3]["reasoning"] == "S"
    assert fixed[4]["tool_calls"] == []  # only an assistant's turn is touched


def test_auto_and_none_leave_plain_text_alone(server, client):
    for choice in ("auto", "none"):
        out = client.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS,
                                             tool_choice=choice, max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True})
        message = out.choices[0].message
        assert message.tool_calls is None and message.content
        assert out.choices[0].finish_reason == "length"
        streamed = _streamed(client.chat.completions.create(
            model=MODEL, messages=CHAT, tools=TOOLS, tool_choice=choice, max_tokens=8,
            temperature=0, stream=True, extra_body={"ignore_eos": True}))
        assert streamed[0]["content"] == message.content and not streamed[0]["tool_calls"]
        assert streamed[0]["finish_reason"] == "length"


def test_a_masked_tokens_logprob_is_shown_as_vllm_shows_it(server):
    """min_tokens past a finished grammar: the last token was sampled from an all-masked row,
    its logprob -inf, which JSON cannot carry: -9999.0, as vLLM clamps it (it was a 500)."""
    for path, body in (
        ("/v1/chat/completions", {"messages": CHAT, "logprobs": True}),
        ("/v1/completions", {"prompt": "Answer:", "logprobs": 1}),
    ):
        r = httpx.post(server.url + path, timeout=60, json={
            "model": MODEL, "max_tokens": 8, "min_tokens": 6, "temperature": 0,
            "structured_outputs": {"choice": ["yes", "no"]}, **body})
        assert r.status_code == 200, r.text[:300]
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        lps = choice["logprobs"]
        last = lps["content"][-1]["logprob"] if "content" in lps else lps["token_logprobs"][-1]
        assert last == -9999.0


def test_streamed_tool_calls_carry_every_tokens_logprobs(server):
    """Under tools the text is held back while a call may be starting; its tokens' logprobs
    still go out as they come (they were dropped), so the stream's add up to the answer's."""
    body = {"model": MODEL, "messages": CHAT, "tools": TOOLS, "tool_choice": "required",
            "max_tokens": 40, "temperature": 0, "logprobs": True}
    whole = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    want = [e["token"] for e in whole["choices"][0]["logprobs"]["content"]]
    got = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    got += [e["token"] for e in (c.get("logprobs") or {}).get("content") or []]
    assert len(want) > 3 and got == want


def test_required_tools_keep_their_own_definitions(server):
    """tool_choice required with a tool whose parameters use $defs: the call parses and its
    arguments follow the referenced definition (it was a 400: the pointer did not exist)."""
    where = {"type": "object", "$defs": {"loc": {"enum": ["Oslo", "Rome"]}},
             "properties": {"where": {"$ref": "#/$defs/loc"}}, "required": ["where"],
             "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "go", "parameters": where}}, TOOLS[1]]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": CHAT, "tools": tools, "tool_choice": "required",
        "max_tokens": 40, "temperature": 1.0, "seed": 1})
    assert r.status_code == 200, r.text[:300]
    for call in r.json()["choices"][0]["message"]["tool_calls"]:
        args = json.loads(call["function"]["arguments"])
        if call["function"]["name"] == "go":
            assert args["where"] in ("Oslo", "Rome")


def test_request_fields_that_cannot_apply_are_refused_by_name(server):
    """A request's own chat_template (vLLM refuses it unless --trust-request-chat-template; it
    was dropped, the chat rendered with the model's template), and tool_choice on the batch
    route, which takes no tools (it answered "required" with free text)."""
    template = "{{ raise_exception('the request template was used') }}"
    for path in ("/v1/chat/completions", "/tokenize"):
        r = httpx.post(server.url + path, timeout=60, json={
            "model": MODEL, "messages": CHAT, "max_tokens": 2, "chat_template": template})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template", r.text
    r = httpx.post(server.url + "/v1/chat/completions/batch", timeout=60, json={
        "model": MODEL, "messages": [CHAT], "max_tokens": 2, "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
    ok = httpx.post(server.url + "/v1/chat/completions/batch", timeout=60, json={
        "model": MODEL, "messages": [CHAT], "max_tokens": 2, "tool_choice": "none"})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("field,value", [
    ("guided_json", SCHEMA), ("guided_regex", "[0-9]+"), ("guided_choice", ["yes", "no"]),
    ("guided_grammar", 'start: "a"'), ("guided_json_object", True)])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_vllm_guided_fields_are_refused_by_name(server, field, value, path):
    """vLLM's former guided_* fields were ignored: a 200 with unconstrained text for a client
    that asked for JSON (protocol.UNSUPPORTED_VLLM_FIELDS' rule: refused, never ignored)."""
    r = httpx.post(server.url + path, timeout=60, json={
        "model": MODEL, "messages": CHAT, "prompt": "x", "max_tokens": 4, field: value})
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["param"] == field
    assert "structured_outputs" in r.json()["error"]["message"]
