"""The streamed answer's cost per chunk (issue 11): a RequestGroup hands its reader every output
queued at once, and an SSE stream that fell behind the engine writes them in one send. A reader
that fell behind finds one output per request, its steps merged: what it reads is what the steps
one by one would have said, and a stalled stream holds the size of its text, not a copy of the
text for every step."""

import asyncio
import copy
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


def test_a_reader_takes_every_output_queued_at_once_one_per_request():
    async def main():
        group = _group("a", "b")
        group.put(_output("a", 5, "x"))
        group.put(_output("b", 6, "y"))
        group.put(_output("a", 7, "z", finished=True))
        assert len(group._items) == 2  # "a"'s two steps are one output
        reader = asyncio.create_task(_read(group))
        await asyncio.sleep(0)  # it reads the two, then waits for "b"
        assert not reader.done()
        group.put(_output("b", 8, "w", finished=True))
        return await reader

    assert asyncio.run(main()) == [[("a", "xz"), ("b", "y")], [("b", "w")]]


def test_a_fault_comes_after_the_outputs_handed_over_before_it():
    async def main():
        group = _group("a")
        group.put(_output("a", 5, "x"))
        group.put(_output("a", 6, "y"))
        group.put(EngineFault("the engine core died: killed"))
        group.put(_output("a", 7, "z"))  # after the fault: not merged ahead of it
        assert len(group._items) == 3
        seen = []
        try:
            async for batch in group.batches():
                seen.append([o.outputs[0].delta_text for o in batch])
        except EngineFault as e:
            return seen, str(e)

    assert asyncio.run(main()) == ([["xy"]], "the engine core died: killed")


def test_a_stalled_reader_finds_one_output_per_request_that_reads_as_every_step(make_engine):
    """Two requests (n=2 with logprobs and a stop string; one aborted halfway) run to their end
    while nobody reads: the group holds one output per request all along, and each reads as that
    request's steps one after another."""
    engine = make_engine(text=True)
    ids = {"prompt_token_ids": list(range(300, 340))}
    engine.add_request("a", ids, SamplingParams(temperature=1.0, seed=4, max_tokens=24, n=2,
                                                ignore_eos=True, logprobs=2, stop=[" a", "the"]))
    engine.add_request("b", ids, SamplingParams(temperature=1.0, seed=1, max_tokens=24,
                                                ignore_eos=True))
    group = _group("a", "b")
    steps = {"a": [], "b": []}  # what a prompt reader would have read
    while engine.has_unfinished_requests():
        for out in engine.step():
            steps[out.request_id].append(copy.deepcopy(out))
            group.put(out)
            assert len(group._items) == len([r for r in steps if steps[r]])
        if len(steps["b"]) == 6:
            engine.abort("b")
    assert [len(steps["a"]), len(steps["b"])] == [24, 7]  # "b": 6 steps, then its abort

    async def read():
        return [batch async for batch in group.batches()]

    (batch,) = asyncio.run(read())
    assert [out.request_id for out in batch] == ["a", "b"]
    for out in batch:
        last = steps[out.request_id][-1]
        assert out.finished and len(out.outputs) == len(last.outputs)
        for c, ended in zip(out.outputs, last.outputs, strict=True):
            each = [o.outputs[c.index] for o in steps[out.request_id]]
            assert c.delta_text == "".join(e.delta_text for e in each) == ended.text
            assert c.delta_token_ids == [t for e in each for t in e.delta_token_ids]
            assert c.delta_token_ids == ended.token_ids and len(ended.token_ids) > 1
            if c.delta_logprobs is not None:
                assert c.delta_logprobs == [lp for e in each for lp in e.delta_logprobs]
            assert (c.finish_reason, c.stop_reason) == (ended.finish_reason, ended.stop_reason)
    assert [c.finish_reason for out in batch for c in out.outputs] == ["stop", "length", "abort"]


def _call(body: dict) -> GenerationCall:
    settings = types.SimpleNamespace(return_tokens_as_token_ids=False, force_include_usage=False)
    request = types.SimpleNamespace(app=types.SimpleNamespace(state=None))
    engine = types.SimpleNamespace(tokenizer=None)
    call = GenerationCall(request, engine, CALL, "tiny", SamplingParams(max_tokens=3),
                          chat=False, extras=read_extras(body, chat=False, settings=settings))
    call.index_of, call.token_lists, call.num_prompt_tokens = {f"{CALL}-0": 0}, [[1, 2]], 2
    return call


def test_a_stream_that_fell_behind_writes_its_chunks_in_one_send():
    first_id, second_id = f"{CALL}-0", f"{CALL}-1"
    call = _call({"stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    call.index_of[second_id] = 1
    call.token_lists.append([3, 4, 5])
    call.num_prompt_tokens = 5

    async def main():
        group = _group(first_id, second_id)
        stream = events(call, group, include_usage=True)
        group.put(_output(first_id, 5, "a"))
        first = await stream.__anext__()  # the first step alone
        group.put(_output(second_id, 6, "b"))
        group.put(_output(first_id, 7, "c", finished=True))
        group.put(_output(second_id, 8, "d", finished=True))
        return first, [piece async for piece in stream]

    first, rest = asyncio.run(main())
    assert first.count(b"data: ") == 1
    # three steps in one send, a chunk for each request, then the usage chunk and [DONE]
    caught_up, usage, done = rest
    assert caught_up.count(b"data: ") == 2 and caught_up.endswith(b"\n\n")
    assert done == b"data: [DONE]\n\n"
    chunks = [json.loads(line[6:]) for piece in (first, caught_up, usage)
              for line in piece.decode().split("\n\n") if line]
    assert [c["choices"][0]["text"] for c in chunks[:3]] == ["a", "bd", "c"]
    assert [c["choices"][0]["index"] for c in chunks[:3]] == [0, 1, 0]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:3]] == [None, "length", "length"]
    # continuous usage: each chunk its own choice's tokens so far, batched or not; the last
    # chunk the call's
    assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 2, 4]
    assert [c["usage"]["prompt_tokens"] for c in chunks] == [2, 3, 2, 5]
    assert chunks[3]["choices"] == [] and {c["id"] for c in chunks} == {CALL}


def test_sse_chunks_are_compact_utf8_json():
    body = {"id": CALL, "choices": [{"index": 0, "text": "héllo \"q\"\n", "logprobs": None}]}
    assert sse(body) == ('data: {"id":"cmpl-test","choices":[{"index":0,'
                         '"text":"héllo \\"q\\"\\n","logprobs":null}]}\n\n').encode()
