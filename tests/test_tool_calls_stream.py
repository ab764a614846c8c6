"""Forced tool calls streamed as they come (server/forced_calls.py): whatever the chunking, a
call's delta.tool_calls entries open it once (index, id, type, name) and then only add arguments,
and they join to exactly what the whole answer (ToolCallParser.read) reports, for every output
cut short too."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.tool_calls import ToolCallParser, ToolCallStream

NAMES = ["get_weather", "get_time", "noop"]

REQUIRED = [
    '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]',
    '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
    '{"name": "get_time", "arguments": {"zone": -3}}, {"name": "noop", "arguments": {}}]',
    # escapes and brackets inside strings, nesting, scalars of every kind
    '[{"name": "get_time", "arguments": {"q": "a \\"quoted\\" ]} [{ \\\\", "u": "\\u00e9\\n", '
    '"n": [1, -2.5e3, true, false, null, {"deep": [[{"x": "}"}]]}], "e": {}, "l": []}}]',
    '[{"name": "noop", "arguments": {"q": "one \\" ] } two"}}, {"name": "noop", "arguments": '
    '"\\"{"}]',
    # the grammar's order is name first; arguments first are held until the name
    '[{"arguments": {"city": "Rome"}, "name": "get_weather"}, '
    '{"name": "noop", "arguments": {}}]',
    # whitespace JSON allows, also inside the arguments (sent as written)
    ' [ \n{ "name" :"get_time" ,\t"arguments"\r\n: {\n  "zone": 1,\n  "z": [ 2 ]\n} } ,'
    '{"name": "noop", "arguments": {}}\n]\n ',
    '[{"name": "get_time", "arguments": "a string"}]',  # a tool whose parameters are no object
    '[{"name": "get_time", "arguments": 12}]',
    '[{"name": "get_time", "parameters": {"zone": 2}}]',  # Llama's key
]
NAMED = ['{"zone": 4}', '{"q": "x \\" } y", "n": [1, {"a": null}]}', '\n {"zone": 1} ']


def chunkings(text: str) -> list[list[str]]:
    """The text whole, a character at a time, in pairs, and split at random points."""
    out = [[text], list(text), [text[i:i + 2] for i in range(0, len(text), 2)]]
    rng = random.Random(len(text))
    for _ in range(12):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 9))))
        out.append([text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


def streamed(parser: ToolCallParser, pieces: list[str]) -> tuple[list[dict], list[dict], bool]:
    """(the calls the stream's entries add up to, its content deltas, whether its calls were
    whole), checking each entry's form as it comes."""
    stream = ToolCallStream(parser)
    calls, content = [], []
    for i, piece in enumerate(pieces):
        deltas = stream.feed(piece)
        last, whole = stream.finish() if i == len(pieces) - 1 else ([], None)
        for delta in deltas + last:
            if "content" in delta:
                content.append(delta)
                continue
            [entry] = delta["tool_calls"]  # one call's entry a delta
            if entry["index"] == len(calls):  # a call opens once, with its id and name
                assert set(entry) == {"index", "id", "type", "function"}
                assert entry["id"].startswith("call_") and entry["type"] == "function"
                assert set(entry["function"]) == {"name", "arguments"}
                calls.append({"id": entry["id"], "type": "function",
                              "function": dict(entry["function"])})
            else:  # then only more of its arguments, and no call goes back to an earlier one
                assert entry["index"] == len(calls) - 1
                assert entry == {"index": entry["index"],
                                 "function": {"arguments": entry["function"]["arguments"]}}
                assert entry["function"]["arguments"]
                calls[-1]["function"]["arguments"] += entry["function"]["arguments"]
    return calls, content, whole


def without_ids(calls: list[dict]) -> list[dict]:
    return [call["function"] for call in calls]


@pytest.mark.parametrize("text", REQUIRED)
def test_required_calls_stream_as_the_whole_answer_reads_them(text):
    parser = ToolCallParser("required", NAMES)
    content, calls, whole = parser.read(text)
    assert content is None and whole
    want = [(c["name"], c.get("arguments", c.get("parameters"))) for c in json.loads(text)]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] \
        == want
    assert parser.finish_reason("stop", whole) == "tool_calls"
    for pieces in chunkings(text):
        got, sent_content, got_whole = streamed(parser, pieces)
        assert without_ids(got) == without_ids(calls) and got_whole and not sent_content
        assert len({c["id"] for c in got}) == len(got)


def test_arguments_are_the_text_the_model_wrote():
    """Not re-encoded: escapes and spacing stay as written, so the deltas can be that text."""
    text = '[{"name": "noop", "arguments": {"u": "\\u00e9\\/", "n":1}}]'
    _, [call], _ = ToolCallParser("required", NAMES).read(text)
    assert call["function"]["arguments"] == '{"u": "\\u00e9\\/", "n":1}'


@pytest.mark.parametrize("text", NAMED)
def test_a_named_call_streams_its_text_as_the_arguments(text):
    parser = ToolCallParser("get_time", NAMES)
    content, [call], whole = parser.read(text)
    assert content is None and whole and call["function"] == {"name": "get_time",
                                                              "arguments": text}
    assert parser.finish_reason("stop", whole) == "stop"  # a named call ends as OpenAI's
    for pieces in chunkings(text):
        got, sent_content, _ = streamed(parser, pieces)
        assert without_ids(got) == [call["function"]] and not sent_content


def test_a_named_call_opens_with_its_first_text():
    stream = ToolCallStream(ToolCallParser("get_time", NAMES))
    assert stream.feed("\n") == []  # blank: no call yet (it may be all the output)
    [delta] = stream.feed('{"zo')
    assert delta["tool_calls"][0]["function"] == {"name": "get_time", "arguments": '\n{"zo'}
    assert stream.feed('ne": 1}') == [{"tool_calls": [{"index": 0,
                                                       "function": {"arguments": 'ne": 1}'}}]}]


@pytest.mark.parametrize("choice, text", [("required", REQUIRED[1]), ("get_time", NAMED[1])])
def test_a_step_with_no_text_sends_no_entry(choice, text):
    """A step whose text is held back (a stop string may start there, a character's bytes are
    still to come) or the eos step feeds "": a named call sent an entry of empty arguments for
    each such step."""
    parser = ToolCallParser(choice, NAMES)
    _, want, _ = parser.read(text)
    stream = ToolCallStream(parser)
    entries = []
    for piece in [text[:12], "", text[12:20], "", "", text[20:], ""]:
        entries += [d["tool_calls"][0] for d in stream.feed(piece)]
    assert stream.finish() == ([], True)
    assert all(e["function"]["arguments"] for e in entries[1:]), entries
    assert "".join(e["function"]["arguments"] for e in entries
                   if e["index"] == 0) == want[0]["function"]["arguments"]


def test_a_call_goes_out_once_its_name_is_complete():
    stream = ToolCallStream(ToolCallParser("required", NAMES))
    assert stream.feed('[{"name": "get_ti') == []
    [delta] = stream.feed('me", "arguments": {"zo')
    assert delta["tool_calls"][0]["function"] == {"name": "get_time", "arguments": '{"zo'}
    rest, opened = stream.feed('ne": 1}}, {"name": "noop", "argu')
    assert rest == {"tool_calls": [{"index": 0, "function": {"arguments": 'ne": 1}'}}]}
    assert opened["tool_calls"][0]["index"] == 1
    assert opened["tool_calls"][0]["function"] == {"name": "noop", "arguments": ""}
    assert stream.feed('ments": {}}]') == [{"tool_calls": [{"index": 1,
                                                            "function": {"arguments": "{}"}}]}]
    assert stream.finish() == ([], True)


@pytest.mark.parametrize("choice, text", [("required", t) for t in REQUIRED[:6]]
                         + [("get_time", t) for t in NAMED[:2]])
def test_an_output_cut_anywhere_streams_as_the_whole_answer_reads_it(choice, text):
    """max_tokens (or a stop string) may end the output anywhere. What went out stands, so both
    answers hold the calls begun, the last one's arguments as far as they came, with the
    engine's finish_reason; before any call began, the output is content."""
    parser = ToolCallParser(choice, NAMES)
    _, full, _ = parser.read(text)
    for end in range(len(text.rstrip())):  # up to its last character, left out
        cut = text[:end]
        content, calls, whole = parser.read(cut)
        assert not whole and parser.finish_reason("length", whole) == "length"
        if calls:
            assert content is None and len(calls) <= len(full)
            assert without_ids(calls[:-1]) == without_ids(full[:len(calls) - 1])
            assert calls[-1]["function"]["name"] == full[len(calls) - 1]["function"]["name"]
            assert full[len(calls) - 1]["function"]["arguments"].startswith(
                calls[-1]["function"]["arguments"])
        else:
            assert content == cut
        for pieces in chunkings(cut)[:4] if cut else [[""]]:
            got, sent_content, got_whole = streamed(parser, pieces)
            assert without_ids(got) == without_ids(calls) and got_whole is False
            assert "".join(d["content"] for d in sent_content) == ("" if calls else cut)


def test_a_cut_call_is_reported_once_its_name_is_complete():
    parser = ToolCallParser("required", NAMES)
    assert parser.read('[{"name": "get_wea') == ('[{"name": "get_wea', [], False)
    _, [call], whole = parser.read('[{"name": "get_weather", "arguments": {"city": "Pa')
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Pa'}
    assert not whole
    parser = ToolCallParser("get_time", NAMES)
    assert parser.read(" ") == (" ", [], False)
    _, [call], whole = parser.read('{"zone": ')
    assert call["function"] == {"name": "get_time", "arguments": '{"zone": '} and not whole


def test_only_the_first_call_goes_out_without_parallel_tool_calls():
    text = REQUIRED[1]
    parser = ToolCallParser("required", NAMES, parallel=False)
    _, [call], whole = parser.read(text)
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert whole
    for pieces in chunkings(text):
        got, _, _ = streamed(parser, pieces)
        assert without_ids(got) == [call["function"]]


@pytest.mark.parametrize("text", [
    '[{"name": "nope", "arguments": {}}]',  # no such tool
    '{"name": "get_time", "arguments": {}}',  # no array
    "[]",
    '[{"arguments": {"a": 1}}]',  # no name
])
def test_an_output_that_opens_no_call_is_content(text):
    parser = ToolCallParser("required", NAMES)
    assert parser.read(text) == (text, [], False)
    for pieces in chunkings(text):
        got, content, whole = streamed(parser, pieces)
        assert got == [] and whole is False
        assert [d["content"] for d in content] == [text]  # whole at the end, as before


def test_text_after_the_calls_leaves_them_not_whole():
    parser = ToolCallParser("required", NAMES)
    _, [call], whole = parser.read('[{"name": "noop", "arguments": {}}] x')
    assert call["function"]["arguments"] == "{}" and not whole
    _, [call], whole = parser.read('[{"name": "noop", "arguments": {}}, 5]')
    assert call["function"]["arguments"] == "{}" and not whole


_TEXT = st.text(st.sampled_from('ab"\\/]}[{,: \n\u00e9\U0001f600'), max_size=6)
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-999, 999)
                     | st.floats(allow_nan=False, allow_infinity=False) | _TEXT,
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(_TEXT, inner, max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(NAMES), _JSON), min_size=1, max_size=3),
       st.booleans(), st.booleans(), st.data())
def test_any_calls_cut_and_chunked_anyhow_stream_as_the_whole_answer_reads_them(
        calls, named, parallel, data):
    """Arguments of any JSON (escapes, non-BMP characters, brackets inside strings), as the
    grammar writes them, cut anywhere and split anyhow, empty pieces too (steps whose text is
    held back): the entries join to the whole answer's calls, each opened once, the next ones
    never empty, and never a second call without parallel_tool_calls."""
    args = [json.dumps(a, ensure_ascii=data.draw(st.booleans())) for _, a in calls]
    if named:
        parser, text = ToolCallParser("get_time", NAMES), args[0]
        want = [{"name": "get_time", "arguments": text}]
    else:
        parser = ToolCallParser("required", NAMES, parallel)
        text = "[" + ", ".join(f'{{"name": "{n}", "arguments": {a}}}'
                               for (n, _), a in zip(calls, args, strict=True)) + "]"
        want = [{"name": n, "arguments": a} for (n, _), a in zip(calls, args, strict=True)]
        want = want if parallel else want[:1]
    _, full, whole = parser.read(text)
    assert without_ids(full) == want and whole
    cut = text[:data.draw(st.integers(0, len(text)))]
    content, calls_read, whole = parser.read(cut)
    ends = sorted(data.draw(st.lists(st.integers(0, len(cut)), max_size=8)))
    pieces = [cut[i:j] for i, j in zip([0, *ends], [*ends, len(cut)], strict=True)]
    got, sent_content, got_whole = streamed(parser, pieces or [""])
    assert without_ids(got) == without_ids(calls_read) and got_whole == whole
    assert "".join(d["content"] for d in sent_content) == (content or "")
    assert len(got) <= (len(want) if parallel or named else 1)
