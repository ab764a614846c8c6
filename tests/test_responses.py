"""POST /v1/responses (OpenAI's Responses API) end to end with the `openai` SDK: a real uvicorn, the
tiny random model with the SmolLM2 tokenizer. Its free text is noise, so what is held is that a
response asks exactly what the matching chat call asks (greedy: the same text, the same usage),
and that the grammar makes structured outputs and forced tool calls parse."""

import concurrent.futures
import json
import typing

import pytest

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import pydantic  # noqa: E402
import test_server_structured as structured  # noqa: E402
from openai.types.responses import Response, ResponseStreamEvent  # noqa: E402
from test_server import MODEL, Server, _make_failing_core  # noqa: E402

from server.app import create_app  # noqa: E402
from server.protocol import APIError  # noqa: E402
from server.responses import ResponseStore  # noqa: E402

# its fixtures: a server of this module's own (module scope) with the tiny model, its SDK client
server, client = structured.server, structured.client
SCHEMA, WEATHER = structured.SCHEMA, structured.WEATHER
QUESTION = "Tell me a story."
GREEDY = {"temperature": 0, "max_output_tokens": 10}
TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
        "parameters": WEATHER, "strict": True}
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather",
                                              "description": "The weather in a city.",
                                              "parameters": WEATHER, "strict": True}}


# The SDK builds its objects without validating them (a missing field goes unnoticed): these
# validate what the server sends against the SDK's types, strictly. Its event union is tagged
# by "type" through the SDK's own annotation, which pydantic does not read: tagged again here.
STREAM_EVENT = pydantic.TypeAdapter(
    typing.Annotated[typing.get_args(ResponseStreamEvent)[0],
                     pydantic.Field(discriminator="type")])
# Fields the server sends as OpenAI's API does, which the SDK's types lack.
NOT_IN_THE_SDK = {"store", "name"}


def _unknown_fields(model, at: str = "") -> list[str]:
    """The fields of a validated `model` (and of the models in it) its type does not name."""
    if isinstance(model, list):
        return [f for i, m in enumerate(model) for f in _unknown_fields(m, f"{at}[{i}]")]
    if not isinstance(model, pydantic.BaseModel):
        return []
    return [f"{at}.{k}" for k in model.model_extra or () if k not in NOT_IN_THE_SDK] + \
        [f for k in type(model).model_fields for f in _unknown_fields(getattr(model, k), at + k)]


def valid_response(obj: dict) -> Response:
    r = Response.model_validate(obj, strict=True)
    assert not _unknown_fields(r), _unknown_fields(r)
    return r


def raw_events(url: str, body: dict) -> list[dict]:
    """The events of one streamed response as sent, each validated: its `event:` line names its
    type, and sequence_number counts from 0."""
    events, kind = [], None
    with httpx.stream("POST", url + "/v1/responses", json={**body, "stream": True},
                      timeout=60) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                assert event["type"] == kind and event["sequence_number"] == len(events)
                valid = STREAM_EVENT.validate_python(event, strict=True)
                assert not _unknown_fields(valid), _unknown_fields(valid)
                events.append(event)
    return events


def chat(client, messages, **kw):
    out = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                         max_tokens=10, **kw)
    return out.choices[0], out.usage


def as_input(output) -> list[dict]:
    """A response's output items as the next request's input items (as a client sends them)."""
    return [item.model_dump(exclude_none=True) for item in output]


def test_text_and_usage_equal_chat(server, client):
    choice, usage = chat(client, [{"role": "user", "content": QUESTION}])
    again = chat(client, [{"role": "user", "content": QUESTION}])[1]  # its prompt cached now
    r = client.responses.create(model=MODEL, input=QUESTION, **GREEDY)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL
    assert r.output_text == choice.message.content and r.output_text
    [message] = r.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == \
        (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
    assert r.usage.input_tokens_details.cached_tokens == \
        again.prompt_tokens_details.cached_tokens > 0
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    # the request's settings echoed
    assert (r.temperature, r.max_output_tokens, r.tool_choice, r.tools, r.store) == \
        (0.0, 10, "auto", [], True)
    assert r.text.format.type == "text" and r.parallel_tool_calls is True
    server.wait_idle()


def test_instructions_and_input_items_equal_chat(client):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "system", "content": "Answer in English."},
                {"role": "user", "content": "Hello\nthere"}]
    choice, usage = chat(client, messages)
    items = [{"type": "message", "role": "developer", "content": "Answer in English."},
             {"role": "user", "content": [{"type": "input_text", "text": "Hello"},
                                          {"type": "input_text", "text": "there"}]}]
    r = client.responses.create(model=MODEL, instructions="Be brief.", input=items, **GREEDY)
    assert r.output_text == choice.message.content
    assert r.usage.input_tokens == usage.prompt_tokens
    assert r.instructions == "Be brief."
    without = client.responses.create(model=MODEL, input=items, **GREEDY)
    assert without.usage.input_tokens < r.usage.input_tokens  # the instructions were rendered


def test_previous_response_id_equals_the_whole_conversation(server, client):
    first = client.responses.create(model=MODEL, instructions="Be brief.", input=QUESTION,
                                    metadata={"turn": "1"}, **GREEDY)
    assert first.metadata == {"turn": "1"}
    second = client.responses.create(model=MODEL, previous_response_id=first.id,
                                     input="And then?", **GREEDY)
    assert second.previous_response_id == first.id
    # instructions are not carried over (OpenAI's rule): the whole conversation without them
    whole = [{"role": "user", "content": QUESTION}, *as_input(first.output),
             {"role": "user", "content": "And then?"}]
    sent = client.responses.create(model=MODEL, input=whole, store=False, **GREEDY)
    assert second.output_text == sent.output_text
    assert second.usage.input_tokens == sent.usage.input_tokens
    choice, usage = chat(client, [{"role": "user", "content": QUESTION},
                                  {"role": "assistant", "content": first.output_text},
                                  {"role": "user", "content": "And then?"}])
    assert second.output_text == choice.message.content
    assert second.usage.input_tokens == usage.prompt_tokens
    third = client.responses.create(model=MODEL, previous_response_id=second.id,
                                    input="The end.", **GREEDY)
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens
    server.wait_idle()


def test_max_output_tokens_is_incomplete(client):
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=3,
                                extra_body={"ignore_eos": True})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.usage.output_tokens == 3


def test_vllm_bad_words_reach_the_sampler(client):
    ask = dict(model=MODEL, input=QUESTION, max_output_tokens=12, temperature=0.0,
               extra_body={"ignore_eos": True})
    free = client.responses.create(**ask).output_text
    word = free.split()[0]
    banned = client.responses.create(**{**ask, "extra_body": {"ignore_eos": True,
                                                              "bad_words": [word]}})
    assert banned.output_text.split()[0] != word and banned.output_text != free


def test_json_schema_output_parses_and_validates(server, client):
    before = server.metric("pagedserve_structured_output_requests_total")
    fmt = {"type": "json_schema", "name": "trip", "schema": SCHEMA, "strict": True}
    for seed in range(4):
        r = client.responses.create(model=MODEL, input="Plan a trip.", text={"format": fmt},
                                    temperature=1.0, max_output_tokens=60,
                                    extra_body={"seed": seed})
        assert r.status == "completed" and r.output[0].status == "completed"
        jsonschema.validate(json.loads(r.output_text), SCHEMA)
    assert r.text.format.type == "json_schema" and r.text.format.name == "trip"
    r = client.responses.create(model=MODEL, input="JSON please.", max_output_tokens=40,
                                text={"format": {"type": "json_object"}}, temperature=1.0,
                                extra_body={"seed": 1})
    assert isinstance(json.loads(r.output_text), dict)
    assert server.metric("pagedserve_structured_output_requests_total") == before + 5


def test_function_tool_round_trip(server, client):
    named = {"type": "function", "name": "get_weather"}
    r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[TOOL],
                                tool_choice=named, temperature=0, max_output_tokens=40)
    assert r.status == "completed" and r.output_text == ""
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    assert r.tools[0].name == "get_weather" and r.tool_choice.name == "get_weather"
    # the same call through chat: the same arguments
    choice, _ = chat(client, [{"role": "user", "content": "Weather in Paris?"}],
                     tools=[CHAT_TOOL], max_completion_tokens=40,
                     tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert choice.message.tool_calls[0].function.arguments == call.arguments
    # the follow-up: the tool's output answers the call, and the model goes on from there
    answer = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    follow = client.responses.create(model=MODEL, previous_response_id=r.id, input=[answer],
                                     tools=[TOOL], **GREEDY)
    choice, usage = chat(client, [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function",
             "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 21 C"}],
        tools=[CHAT_TOOL])
    assert follow.output_text == choice.message.content
    assert follow.usage.input_tokens == usage.prompt_tokens
    # "required" with one call at most
    r = client.responses.create(model=MODEL, input="Weather?", tools=[TOOL],
                                tool_choice="required", parallel_tool_calls=False,
                                temperature=1.0, max_output_tokens=60, extra_body={"seed": 2})
    [call] = r.output
    assert call.type == "function_call" and r.parallel_tool_calls is False
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    server.wait_idle()


def _streamed(client, **kw):
    """(the events, the text their deltas add up to) of one streamed response."""
    events = list(client.responses.create(model=MODEL, stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    return events, text


def _same_output(streamed, whole) -> None:
    """The two responses hold the same output, but for their ids (and the SDK's `parsed`,
    which its stream helper adds)."""
    def shape(item) -> dict:
        d = item.model_dump(exclude={"id", "call_id", "parsed_arguments"})
        for part in d.get("content", ()):
            part.pop("parsed", None)
        return d

    assert [shape(i) for i in streamed.output] == [shape(i) for i in whole.output]
    assert streamed.status == whole.status
    # the later of the two finds its prompt in the prefix cache: cached_tokens differ
    assert streamed.usage.model_dump(exclude={"input_tokens_details"}) == \
        whole.usage.model_dump(exclude={"input_tokens_details"})


def test_stream_events_add_up_to_the_whole_response(server, client):
    whole = client.responses.create(model=MODEL, input=QUESTION, **GREEDY)
    events, text = _streamed(client, input=QUESTION, **GREEDY)
    kinds = [e.type for e in events]
    num_deltas = kinds.count("response.output_text.delta")
    assert num_deltas >= 1
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * num_deltas,
                     "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.incomplete"]
    final = events[-1].response
    assert text == whole.output_text == final.output_text == events[-4].text
    assert events[0].response.id == final.id and events[0].response.status == "in_progress"
    assert {e.item_id for e in events if hasattr(e, "item_id")} == {final.output[0].id}
    _same_output(final, whole)
    # completed: the SDK's stream helper puts the same response together
    fmt = {"type": "json_schema", "name": "trip", "schema": SCHEMA}
    asked = {"input": "Plan a trip.", "text": {"format": fmt}, "temperature": 0,
             "max_output_tokens": 60}
    whole = client.responses.create(model=MODEL, **asked)
    with client.responses.stream(model=MODEL, **asked) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[-1] == "response.completed" and final.status == "completed"
    _same_output(final, whole)
    jsonschema.validate(json.loads(final.output_text), SCHEMA)
    server.wait_idle()


def test_stream_function_call_events(server, client):
    asked = {"input": "Weather in Rome?", "tools": [TOOL], "tool_choice": "required",
             "parallel_tool_calls": False, "temperature": 0, "max_output_tokens": 60}
    whole = client.responses.create(model=MODEL, **asked)
    events, text = _streamed(client, **asked)
    assert text == ""
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    added, delta, done, item_done, completed = events[2:]
    assert added.item.type == "function_call" and added.item.arguments == ""
    assert delta.delta == done.arguments == item_done.item.arguments
    assert item_done.item.id == added.item.id == delta.item_id
    _same_output(completed.response, whole)
    server.wait_idle()


def test_a_cut_function_call_is_incomplete_whole_and_streamed(server, client):
    """max_output_tokens ending a forced call inside its arguments: the call as far as it came
    (the chat stream sends calls a piece at a time: they are put together), its item and the
    response incomplete, streamed as whole."""
    asked = {"input": "Weather in Rome?", "tools": [TOOL], "tool_choice": "required",
             "parallel_tool_calls": False, "temperature": 0, "max_output_tokens": 60}
    [full] = client.responses.create(model=MODEL, **asked).output
    assert full.type == "function_call" and full.status == "completed"
    cut = {**asked, "max_output_tokens": 12}
    whole = client.responses.create(model=MODEL, **cut)
    [call] = whole.output
    assert whole.status == "incomplete" and call.status == "incomplete"
    assert call.name == full.name and full.arguments.startswith(call.arguments)
    assert call.arguments != full.arguments
    events, _ = _streamed(client, **cut)
    assert events[-1].type == "response.incomplete"
    _same_output(events[-1].response, whole)
    server.wait_idle()


@pytest.mark.parametrize("asked", [
    {"input": QUESTION, **GREEDY},  # incomplete
    {"input": "Plan a trip.", "temperature": 0, "max_output_tokens": 60,
     "text": {"format": {"type": "json_schema", "name": "trip", "schema": SCHEMA}}},
    {"input": "Weather?", "tools": [TOOL], "tool_choice": "required", "temperature": 0,
     "max_output_tokens": 60},
], ids=["incomplete", "json_schema", "function_call"])
def test_responses_and_events_are_the_sdks_types(server, asked):
    """Every object and event as sent validates, strictly, against the SDK's own types."""
    body = {"model": MODEL, **asked}
    whole = httpx.post(server.url + "/v1/responses", json=body, timeout=60).json()
    r = valid_response(whole)
    assert valid_response(httpx.get(f"{server.url}/v1/responses/{r.id}").json()) == r
    usage = r.usage.input_tokens_details
    assert 0 <= usage.cached_tokens + usage.cache_write_tokens <= r.usage.input_tokens
    events = raw_events(server.url, body)
    final = valid_response(events[-1]["response"])
    assert events[-1]["type"] == f"response.{final.status}"
    assert final.status == r.status == ("incomplete" if "text" not in asked and "tools" not in
                                        asked else "completed")
    # the last event carries the whole response, as stored
    assert valid_response(httpx.get(f"{server.url}/v1/responses/{final.id}").json()) == final
    for opening in events[:2]:
        assert opening["response"]["status"] == "in_progress"
        assert valid_response(opening["response"]).id == final.id
    # each item's events name it by id and output index, and its done event holds it as it ends
    for event in events[2:-1]:
        item = final.output[event["output_index"]]
        assert event.get("item_id", item.id) == item.id
        if event["type"] == "response.output_item.done":
            assert event["item"] == item.model_dump(exclude_none=True)
        elif event["type"] == "response.output_item.added":
            assert event["item"]["status"] == "in_progress"
    [item] = final.output
    if item.type == "message":
        assert item.status == final.status
        [part] = item.content
        assert part.annotations == [] and part.logprobs == []
        parts = [e["part"] for e in events if e["type"].startswith("response.content_part.")]
        assert [p["logprobs"] for p in parts] == [[], []]
    else:
        assert item.status == "completed" and item.id and item.call_id != item.id
    server.wait_idle()


def test_leaving_a_stream_aborts_its_request(server, client):
    with client.responses.create(model=MODEL, input=QUESTION, stream=True,
                                 max_output_tokens=200, extra_body={"ignore_eos": True}) as s:
        for event in s:
            if event.type == "response.output_text.delta":
                break
    server.wait_idle()


def test_an_engine_fault_mid_stream_is_an_error_event():
    s = Server(create_app(served_model_name=MODEL, make_core=_make_failing_core,
                          on_fatal=lambda cause: None))
    try:
        body = {"model": MODEL, "input": QUESTION, "max_output_tokens": 200,
                "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor() as pool:
            events = pool.submit(raw_events, s.url, body)  # each validated as it comes
            # a second request in the core: the fault
            httpx.post(s.url + "/v1/completions", timeout=30,
                       json={"model": MODEL, "prompt": "hi", "max_tokens": 200})
            events = events.result()
        assert events[0]["type"] == "response.created"
        error = events[-1]
        assert error["type"] == "error" and "simulated device fault" in error["message"]
        assert error["code"] == "server_error" and error["param"] is None
    finally:
        s.stop()


def test_get_and_delete_stored_responses(server, client):
    r = client.responses.create(model=MODEL, input=QUESTION, **GREEDY)
    assert client.responses.retrieve(r.id).model_dump() == r.model_dump()
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    unstored = client.responses.create(model=MODEL, input=QUESTION, store=False, **GREEDY)
    assert unstored.store is False
    answer = httpx.get(f"{server.url}/v1/responses/{unstored.id}")
    assert answer.status_code == 404 and unstored.id in answer.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, previous_response_id=unstored.id, input="Hi")
    assert e.value.body["param"] == "previous_response_id"
    assert unstored.id in e.value.body["message"]


@pytest.mark.parametrize("fields,param", [
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tools": [{**TOOL, "defer_loading": True}]}, "tools"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
    ({"input": [{"type": "item_reference", "id": "rs_1"}]}, "input[0].type"),
    ({"input": [{"type": "reasoning", "summary": [], "encrypted_content": "x"}]},
     "input[0].encrypted_content"),
    ({"input": [{"type": "reasoning", "summary": [{"type": "summary_text"}]}]},
     "input[0].content"),
    ({"input": [{"type": "reasoning", "summary": 5}]}, "input[0].content"),
    ({"input": [{"type": "reasoning", "content": True}]}, "input[0].content"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": ["user"], "content": "x"}]}, "input[0].role"),  # it was a 500
    ({"input": [{"type": "message", "role": {"user": 1}, "content": "x"}]}, "input[0].role"),
    ({"input": []}, "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),  # no message left
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]},
     "input"),
    ({"text": {"format": {"type": "xml"}}}, "text.format"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "objec"}}}},
     "text.format"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": None}}}, "text.format"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": "{}"}}}, "text.format"),
    ({"text": {"format": {"type": "json_schema", "schema": SCHEMA}}}, "text.format"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ({"max_output_tokens": 100_000}, "max_output_tokens"),
    ({"max_output_tokens": -1}, "max_output_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"stream_options": {}}, "stream_options"),
    ({"model": "other"}, "model"),
])
def test_bad_fields_are_refused_by_name(server, fields, param):
    body = {"model": MODEL, "input": QUESTION, **fields}
    answer = httpx.post(server.url + "/v1/responses", json=body)
    assert answer.status_code == (404 if param == "model" else 400), answer.text
    error = answer.json()["error"]
    assert error["param"] == param, error
    assert "'messages'" not in error["message"] and "completion_tokens" not in error["message"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fields,param", [
    ({"tools": [{**TOOL, "parameters": {"type": "object", "properties": {
        "x": {"type": "number", "maximum": "Infinity"}}}}]},
     "tools[0].parameters.properties.x.maximum"),
    ({"tools": [{"type": "function", "name": "f", "description": "NaN"}]},
     "tools[0].description"),
    ({"text": {"format": {"type": "json_object", "x": ["-Infinity"]}}}, "text.format.x[0]"),
])
def test_non_finite_numbers_in_echoed_fields_are_refused(server, fields, param, stream):
    """tools and text.format come back in the response as sent: a NaN or an infinity there
    (or 1e400, a float's infinity once parsed) could not be written as JSON (a 500, and a
    stored response that GET failed on), so it is a 400 naming where it is."""
    body = json.dumps({"model": MODEL, "input": QUESTION, "max_output_tokens": 2,
                       "stream": stream, **fields})
    for word in ("-Infinity", "Infinity", "NaN"):
        body = body.replace(f'"{word}"', word)
    answer = httpx.post(server.url + "/v1/responses", content=body,
                        headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    server.wait_idle()
    answer = httpx.post(server.url + "/v1/responses", content=body.replace("Infinity", "1e400"),
                        headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 or "NaN" in body, answer.text


def test_harmless_fields_are_accepted(client):
    r = client.responses.create(model=MODEL, input=QUESTION, user="u1", service_tier="auto",
                                prompt_cache_key="k", safety_identifier="s", background=False,
                                reasoning={"effort": None}, truncation="disabled", include=[],
                                **GREEDY)
    assert r.status == "incomplete" and r.user == "u1"


def test_the_api_key_guards_responses(app_client):
    client = app_client(api_key="secret")
    body = {"model": "tiny", "input": QUESTION, "max_output_tokens": 2}
    assert client.post("/v1/responses", json=body).status_code == 401
    answer = client.post("/v1/responses", json=body,
                         headers={"Authorization": "Bearer secret"})
    assert answer.status_code == 200 and answer.json()["usage"]["output_tokens"] <= 2
    assert client.get(f"/v1/responses/{answer.json()['id']}").status_code == 401


def test_response_store_keeps_the_most_recently_used():
    store = ResponseStore(capacity=2)
    for name in ("a", "b"):
        store.put({"id": name}, [{"role": "user", "content": name}])
    store.get("a")  # used: "b" is now the oldest
    store.put({"id": "c"}, [])
    assert store.get("a")[1] == [{"role": "user", "content": "a"}] and store.get("c")
    with pytest.raises(APIError) as e:
        store.get("b", "previous_response_id")
    assert e.value.status == 404 and e.value.param == "previous_response_id"
    empty = ResponseStore(capacity=0)
    empty.put({"id": "a"}, [])
    with pytest.raises(APIError):
        empty.get("a")
