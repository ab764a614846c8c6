"""The streamed answer's cost per chunk (issue 11): a RequestGroup hands its reader every output
queued at once, and an SSE stream that fell behind the engine writes them in one send, with the
same chunks it would have written one by one."""

import asyncio
import json
import types

from engine.core.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.core.sampling_params import SamplingParams
from server.async_engine import EngineFault, RequestGroup
from server.extras import read_extras
from server.generation_call import GenerationCall
from server.sse_stream import events, sse
from server.timeline import Timeline

CALL = "cmpl-test"


def _output(request_id: str, token: int, text: str, finished: bool = False) -> RequestOutput:
    c = CompletionOutput(0, "", [], 0.0, None, "length" if finished else None,
                         delta_text=text, delta_token_ids=[token])
    return RequestOutput(request_id, None, [1, 2], [c], finished, RequestMetrics(0.0))


def _group(*request_ids) -> RequestGroup:
    engine = types.SimpleNamespace(abort=lambda request_id: None, timeline=Timeline())
    group = RequestGroup(engine)
    group.unfinished.update(request_ids)
    return group


async def _read(group) -> list:
    return [[(o.request_id, o.outputs[0].delta_text) for o in batch]
            async for batch in group.batches()]


def test_a_reader_takes_every_output_queued_at_once():
    async def main():
        group = _group("a", "b")
        group.put(_output("a", 5, "x"))
        group.put(_output("b", 6, "y"))
        group.put(_output("a", 7, "z", finished=True))
        reader = asyncio.create_task(_read(group))
        await asyncio.sleep(0)  # it reads the three, then waits for "b"
        assert not reader.done()
        group.put(_output("b", 8, "w", finished=True))
        return await reader

    assert asyncio.run(main()) == [[("a", "x"), ("b", "y"), ("a", "z")], [("b", "w")]]


def test_a_fault_comes_after_the_outputs_handed_over_before_it():
    async def main():
        group = _group("a")
        group.put(_output("a", 5, "x"))
        group.put(EngineFault("the engine core died: killed"))
        seen = []
        try:
            async for batch in group.batches():
                seen.append([o.outputs[0].delta_text for o in batch])
        except EngineFault as e:
            return seen, str(e)

    assert asyncio.run(main()) == ([["x"]], "the engine core died: killed")


def _call(body: dict) -> GenerationCall:
    settings = types.SimpleNamespace(return_tokens_as_token_ids=False, force_include_usage=False)
    request = types.SimpleNamespace(app=types.SimpleNamespace(state=None))
    engine = types.SimpleNamespace(tokenizer=None)
    call = GenerationCall(request, engine, CALL, "tiny", SamplingParams(max_tokens=3),
                          chat=False, extras=read_extras(body, chat=False, settings=settings))
    call.index_of, call.token_lists, call.num_prompt_tokens = {f"{CALL}-0": 0}, [[1, 2]], 2
    return call


def test_a_stream_that_fell_behind_writes_its_chunks_in_one_send():
    request_id = f"{CALL}-0"
    call = _call({"stream_options": {"include_usage": True, "continuous_usage_stats": True}})

    async def main():
        group = _group(request_id)
        stream = events(call, group, include_usage=True)
        group.put(_output(request_id, 5, "a"))
        first = await stream.__anext__()  # the first step alone
        group.put(_output(request_id, 6, "b"))
        group.put(_output(request_id, 7, "c", finished=True))
        return first, [piece async for piece in stream]

    first, rest = asyncio.run(main())
    assert first.count(b"data: ") == 1
    caught_up, usage, done = rest  # two steps in one send, then the usage chunk and [DONE]
    assert caught_up.count(b"data: ") == 2 and caught_up.endswith(b"\n\n")
    assert done == b"data: [DONE]\n\n"
    chunks = [json.loads(line[6:]) for piece in (first, caught_up, usage)
              for line in piece.decode().split("\n\n") if line]
    assert [c["choices"][0]["text"] for c in chunks[:3]] == ["a", "b", "c"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:3]] == [None, None, "length"]
    # continuous usage counts each chunk's tokens, batched or not
    assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 3, 3]
    assert chunks[3]["choices"] == [] and {c["id"] for c in chunks} == {CALL}


def test_sse_chunks_are_compact_utf8_json():
    body = {"id": CALL, "choices": [{"index": 0, "text": "héllo \"q\"\n", "logprobs": None}]}
    assert sse(body) == ('data: {"id":"cmpl-test","choices":[{"index":0,'
                         '"text":"héllo \\"q\\"\\n","logprobs":null}]}\n\n').encode()
