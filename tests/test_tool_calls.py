"""Tool calling's parsing, checks and grammars on hostile or unusual input: the model's text is
arbitrary (deeply nested JSON, long whitespace runs), a body may carry tens of thousands of
tools, and tool schemas use every kind of local $ref."""

import asyncio
import time
import types

import pytest
from conftest import _smollm2_tokenizer

from server.extras import chat_options
from server.handlers import chat_token_ids
from server.protocol import APIError
from server.tool_calls import ToolCallParser, ToolCallStream, parse_tools, tool_grammar

CHAT = [{"role": "user", "content": "hi"}]
DEEP = "[" * 1200 + "]" * 1200  # past json's recursion limit


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "f", "arguments": {"a": ' + DEEP + "}}</tool_call>",
    '{"name": "f", "parameters": {"a": ' + DEEP + "}}",
])
def test_deeply_nested_model_output_reads_as_content(text):
    """Under "auto", JSON nested past the decoder's recursion limit is content, whole or
    streamed (it raised RecursionError: a 500, or a stream cut without [DONE])."""
    parser = ToolCallParser("auto", ["f"])
    assert parser.parse(text) == (text, [])
    stream = ToolCallStream(parser)
    stream.feed(text)
    stream.finish()


@pytest.mark.parametrize("choice, text", [
    ("required", '[{"name": "f", "arguments": {"a": ' + DEEP + "}}]"),
    ("f", '{"a": ' + DEEP + "}"),
])
def test_deeply_nested_forced_arguments_are_a_call(choice, text):
    """Forced calls are read by counting brackets, not by recursing: arguments nested past the
    decoder's recursion limit are a call all the same, whole and streamed."""
    parser = ToolCallParser(choice, ["f"])
    content, [call] = parser.parse(text)
    assert content is None and call["function"]["arguments"] == '{"a": ' + DEEP + "}"
    stream = ToolCallStream(parser)
    [delta] = stream.feed(text)
    assert delta["tool_calls"][0]["function"] == call["function"]
    assert stream.finish()[0] == []  # all went out as it came


def test_a_long_whitespace_run_parses_in_linear_time():
    """`<tool_call>\\s*(.*?)\\s*` backtracked over every whitespace run followed by more text:
    24,000 characters took seconds, on the event loop."""
    parser = ToolCallParser("auto", ["f"])
    text = "<tool_call>a" + " " * 24_000 + "b"
    start = time.monotonic()
    assert parser.parse(text) == (text, [])
    assert time.monotonic() - start < 0.5
    call = '<tool_call>\n  {"name": "f", "arguments": {"x": 1}}  \n</tool_call>'
    [got] = parser.parse(call)[1]  # the body is still stripped
    assert got["function"] == {"name": "f", "arguments": '{"x": 1}'}


def test_many_tools_are_checked_in_linear_time():
    """The duplicate-name check scanned a list per tool: 40,000 tools took ~7 s on the event
    loop. The error naming a missing tool lists ten of them, not all."""
    tools = [{"function": {"name": str(i)}} for i in range(40_000)]
    start = time.monotonic()
    assert parse_tools({"tools": tools})[1] == "auto"
    assert time.monotonic() - start < 1.0
    with pytest.raises(APIError) as e:
        parse_tools({"tools": tools, "tool_choice": {"type": "function",
                                                     "function": {"name": "nope"}}})
    assert len(str(e.value)) < 300 and "0, 1, 2" in str(e.value) and ", ..." in str(e.value)


def _accepts(so, text: str) -> bool:
    from engine.structured_outputs import GrammarCompiler

    tok = _smollm2_tokenizer()
    grammars = GrammarCompiler.for_tokenizer(tok, 49152, [tok.eos_token_id])
    matcher = grammars.check(so).deep_copy()
    return bool(matcher.consume_tokens(tok.encode(text, add_special_tokens=False))) \
        and not matcher.is_error()


TREE = {"type": "object", "properties": {"label": {"type": "string"},
                                         "kids": {"type": "array", "items": {"$ref": "#"}}},
        "required": ["label", "kids"], "additionalProperties": False}


def test_required_keeps_a_recursive_root_ref_at_the_tools_parameters():
    """With tool_choice "required" the parameters sit inside an array of calls; a `$ref: "#"`
    in them pointed at that array, so a valid call was refused and calls nested as the tree's
    kids were forced."""
    tools = [{"type": "function", "function": {"name": "tree", "parameters": TREE}}]
    so = tool_grammar(tools, "required", True)
    assert _accepts(so, '[{"name": "tree", "arguments": {"label": "a", "kids": '
                        '[{"label": "b", "kids": []}]}}]')
    assert not _accepts(so, '[{"name": "tree", "arguments": {"label": "a", "kids": '
                            '[[{"name": "tree", "arguments": {"label": "b", "kids": []}}]]}}]')


@pytest.mark.parametrize("params, call", [
    ({"type": "object", "definitions": {"u": {"enum": ["c", "f"]}},  # draft-07 (pydantic v1)
      "properties": {"unit": {"$ref": "#/definitions/u"}}, "required": ["unit"]},
     '{"unit": "c"}'),
    ({"type": "object", "properties": {"a": {"type": "string"},  # zod-to-json-schema's
                                       "b": {"$ref": "#/properties/a"}}, "required": ["b"]},
     '{"b": "x"}'),
    ({"type": "object", "$defs": {"u": {"enum": ["c", "f"]}},
      "properties": {"unit": {"$ref": "#/$defs/u"}}, "required": ["unit"]}, '{"unit": "f"}'),
])
def test_required_compiles_every_schema_a_named_tool_compiles(params, call):
    """"#/definitions/..." and "#/properties/..." were a 400 ("Pointer does not exist") under
    "required"; two tools may now also define one $defs name differently."""
    other = {"type": "object", "$defs": {"u": {"type": "integer"}},
             "properties": {"n": {"$ref": "#/$defs/u"}}, "required": ["n"]}
    tools = [{"type": "function", "function": {"name": "w", "parameters": params}},
             {"type": "function", "function": {"name": "v", "parameters": other}}]
    assert _accepts(tool_grammar(tools, "w", True), call)
    so = tool_grammar(tools, "required", True)
    assert _accepts(so, f'[{{"name": "w", "arguments": {call}}}, '
                        '{"name": "v", "arguments": {"n": 3}}]')
    assert not _accepts(so, '[{"name": "v", "arguments": {"n": "c"}}]')


def test_chat_template_kwargs_cannot_set_the_render_deadline():
    """chat_template_kwargs reach apply_chat_template as keyword arguments: `render_seconds`
    there lifted the deadline that stops a slow template."""
    for name in ("render_seconds", "chat_template"):
        with pytest.raises(APIError) as e:
            chat_options(CHAT, {"messages": CHAT, "chat_template_kwargs": {name: 4}})
        assert e.value.param == "chat_template_kwargs" and name in str(e.value)
    request = types.SimpleNamespace(
        app=types.SimpleNamespace(state=types.SimpleNamespace(
            settings=types.SimpleNamespace(chat_content_special_tokens=False))),
        state=types.SimpleNamespace(body_bytes=100))
    engine = types.SimpleNamespace(tokenizer=_smollm2_tokenizer())
    ids = asyncio.run(chat_token_ids(request, engine, CHAT,
                                     **chat_options(CHAT, {"messages": CHAT}).template_options))
    assert ids == _smollm2_tokenizer().apply_chat_template(CHAT)


@pytest.mark.parametrize("params, good, bad", [
    ({"$id": "weather.json", "type": "object", "$defs": {"u": {"enum": ["c", "f"]}},
      "properties": {"unit": {"$ref": "#/$defs/u"}}, "required": ["unit"],
      "additionalProperties": False}, '{"unit": "c"}', '{"unit": "k"}'),
    ({"type": "object", "properties": {"loc": {
        "$id": "https://example.com/loc", "type": "object", "$defs": {"c": {"enum": ["Oslo"]}},
        "properties": {"city": {"$ref": "#/$defs/c"}}, "required": ["city"],
        "additionalProperties": False}}, "required": ["loc"], "additionalProperties": False},
     '{"loc": {"city": "Oslo"}}', '{"loc": {"city": "Rome"}}'),
])
def test_required_keeps_the_refs_of_a_schema_with_its_own_id(params, good, bad):
    """Under an `$id`, "#" is that subschema: moved under $defs/__tool_i, its references
    pointed into a resource with no such path, a 400 ("Pointer ... does not exist") for a tool
    that compiles with tool_choice naming it."""
    tools = [{"type": "function", "function": {"name": "w", "parameters": params}}]
    assert _accepts(tool_grammar(tools, "w", True), good)
    so = tool_grammar(tools, "required", True)
    assert _accepts(so, f'[{{"name": "w", "arguments": {good}}}]')
    assert not _accepts(so, f'[{{"name": "w", "arguments": {bad}}}]')


def test_required_moves_refs_beside_a_property_named_id():
    """A property named "$id" does not make `properties` a resource of its own: the refs of
    the other properties are still moved under $defs/__tool_i."""
    params = {"type": "object", "$defs": {"u": {"enum": ["c", "f"]}},
              "properties": {"$id": {"type": "string"}, "unit": {"$ref": "#/$defs/u"}},
              "required": ["$id", "unit"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "w", "parameters": params}}]
    so = tool_grammar(tools, "required", True)
    assert _accepts(so, '[{"name": "w", "arguments": {"$id": "a", "unit": "c"}}]')
    assert not _accepts(so, '[{"name": "w", "arguments": {"$id": "a", "unit": "k"}}]')


@pytest.mark.parametrize("text, arguments", [
    ('{"name": "f", "parameters": {"q": "wrap it in <tool_call> tags"}}',
     '{"q": "wrap it in <tool_call> tags"}'),
    ('<|python_tag|>{"name": "f", "parameters": {"code": "print(\'<tool_call>\')"}}',
     '{"code": "print(\'<tool_call>\')"}'),
])
def test_a_llama_call_whose_arguments_hold_the_hermes_tag_is_a_call(text, arguments):
    """A "<tool_call>" inside a Llama call's string argument sent the text down the Hermes path
    only: no call parsed there, and the call came back as content, whole and streamed."""
    parser = ToolCallParser("auto", ["f"])
    content, [call] = parser.parse(text)
    assert content is None and call["function"] == {"name": "f", "arguments": arguments}
    stream = ToolCallStream(parser)
    deltas = [d for ch in text for d in stream.feed(ch)]
    last, is_call = stream.finish()
    assert deltas == [] and is_call
    assert [d["tool_calls"][0]["function"] for d in last] == [call["function"]]


def test_llama_calls_separated_by_crlf_are_calls():
    """"\\r" is JSON whitespace: `;\\r\\n` between two Llama calls made the output content."""
    parser = ToolCallParser("auto", ["f", "g"])
    content, calls = parser.parse('{"name": "f", "parameters": {"a": 1}};\r\n'
                                  '{"name": "g", "parameters": {}}\r\n')
    assert content is None
    assert [c["function"] for c in calls] == [{"name": "f", "arguments": '{"a": 1}'},
                                              {"name": "g", "arguments": "{}"}]


@pytest.mark.parametrize("token", [" word", "\n"])
def test_a_long_streamed_answer_under_tools_is_read_in_linear_time(token):
    """Each streamed delta copied and scanned the whole text so far: 40,000 tokens took ~3 s
    on the event loop (128,000: a minute), also while only whitespace had come."""
    stream = ToolCallStream(ToolCallParser("auto", ["f"]))
    start = time.monotonic()
    sent = [d["content"] for _ in range(40_000) for d in stream.feed(token)]
    last, is_call = stream.finish()
    assert time.monotonic() - start < 1.5
    assert not is_call and "".join(sent) + "".join(d["content"] for d in last) == token * 40_000


@pytest.mark.parametrize("text, streams, calls", [
    ("[link](http://x) and more", True, 0),
    ("  [1, 2] are numbers", True, 0),
    ("{x} is a set", True, 0),
    ("[Thinking] first", True, 0),
    ('[ {"a": 1}] an array of objects', False, 0),  # may have been calls: held to the end
    ('[{"name": "f", "arguments": {}}]', False, 1),
    ('[TOOL_CALLS][{"name": "f", "arguments": {}}]', False, 1),
    ('{"name": "f", "parameters": {}}', False, 1),
    ('[Note] <tool_call>{"name": "f", "arguments": {}}</tool_call>', True, 1),
])
def test_an_answer_opening_with_a_bracket_streams_once_it_cannot_be_calls(text, streams, calls):
    """Under tools ("auto"), output that opens with "{" or "[" is held as bare JSON calls may
    be, only until its first characters tell (a key, an object in an array, Mistral's tag):
    a markdown link or a list then streams as it comes, not all at the end."""
    parser = ToolCallParser("auto", ["f"])
    stream = ToolCallStream(parser)
    early = [d for ch in text for d in stream.feed(ch)]
    last, is_call = stream.finish()
    assert bool(early) is streams and is_call is bool(calls)
    content = "".join(d.get("content", "") for d in early + last)
    want, parsed = parser.parse(text)
    assert content == (want or "") and len(parsed) == calls
    if streams and not calls:  # all but a tag-sized tail went out before the end
        assert len("".join(d["content"] for d in early)) >= len(text) - len("<tool_call>")
