"""The OpenAI-compatible server end to end: a real uvicorn on a loopback port, a tiny random model
(vocab 49152 with the real SmolLM2 tokenizer) on numpy, and the official `openai` SDK."""

import asyncio
import concurrent.futures
import json
import re
import threading
import time

import pytest

# The test extra installs these; a bare GPU box running `pytest -m gpu tests/` may lack them.
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from conftest import _tiny_loaded  # noqa: E402

from engine.model.config import EngineConfig  # noqa: E402
from server.app import create_app  # noqa: E402
from server.cli import build_parser  # noqa: E402

MODEL = "tiny"
MAX_MODEL_LEN = 256


class Server:
    def __init__(self, app):
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uvicorn.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        port = self.uvicorn.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        while httpx.get(self.url + "/health").status_code != 200:
            assert time.time() < deadline + 60, "the engine did not load"
            time.sleep(0.05)

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics").text
        match = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M)
        assert match, f"{name}{labels} not in /metrics"
        return float(match.group(1))

    def wait_idle(self, timeout: float = 10.0):
        """Until the engine holds no request and no KV block."""
        deadline = time.time() + timeout
        while (self.metric("pagedserve_kv_blocks_used") or
               self.metric("pagedserve_num_requests_running") or
               self.metric("pagedserve_num_requests_waiting")):
            assert time.time() < deadline, "requests were left in the engine"
            time.sleep(0.02)

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def sdk_client(server: Server):
    """The openai SDK on `server`; no retries, so a failure shows at once."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _make_core():
    """Runs in the engine-core process (the API process loads the same SmolLM2 tokenizer, the
    default model's)."""
    from engine.engine_core import EngineCore

    config = EngineConfig(device="numpy", max_num_seqs=64, max_model_len=MAX_MODEL_LEN,
                          num_kv_blocks=1024)
    return EngineCore(config, loaded_model=_tiny_loaded(49152, True))


@pytest.fixture(scope="module")
def server():
    with Server(create_app(served_model_name=MODEL, make_core=_make_core,
                           enable_tokenizer_info_endpoint=True,
                           enable_per_request_metrics=True)) as s:
        yield s


@pytest.fixture
def client(server):
    return sdk_client(server)


CHAT = [{"role": "user", "content": "Tell me a story."}]


def test_completions_sdk_streamed_equals_whole(server, client):
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0
    assert whole.choices[0].finish_reason == "length" and whole.choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time",
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # OpenAI: with include_usage "all other chunks will also include a usage field, but with a
    # null value" (a JS client testing `usage !== null` takes a missing one for usage); without
    # it, no chunk has one
    for chat, extra in ((False, {"prompt": "Hi"}), (True, {"messages": CHAT})):
        path = "/v1/chat/completions" if chat else "/v1/completions"
        for include in (True, False, None):  # null: not given (vLLM's reading too)
            with httpx.stream("POST", server.url + path, json={
                    "model": MODEL, "max_tokens": 3, "stream": True, **extra,
                    "stream_options": {"include_usage": include,
                                       "continuous_usage_stats": None}}) as r:
                assert r.status_code == 200, r.read()
                raw = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
            bodies = [json.loads(b) for b in raw]
            if include:
                assert bodies[-1]["choices"] == [] and bodies[-1]["usage"]["completion_tokens"]
                assert all("usage" in b and b["usage"] is None for b in bodies[:-1]), raw
            else:
                assert not any("usage" in b for b in bodies), raw


@pytest.mark.parametrize("chat", [False, True])
def test_text_held_back_for_a_stop_string_sends_no_empty_chunks(client, chat):
    """A stop string that every prefix of the answer begins (the whole greedy answer + a
    character it never writes) holds all text back until the end: no chunk goes out meanwhile
    (each was an empty one), and the text still arrives whole."""
    args = dict(model=MODEL, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    if chat:
        def create(**kw):
            return client.chat.completions.create(messages=CHAT, **args, **kw)

        def text_of(choice):
            message = getattr(choice, "message", None)  # a whole answer's, else a chunk's
            return message.content if message else choice.delta.content
    else:
        def create(**kw):
            return client.completions.create(prompt="Once upon a time", **args, **kw)

        def text_of(choice):
            return choice.text
    whole = text_of(create().choices[0])
    chunks = [c.choices[0] for c in create(stop=[whole + "\x00"], stream=True) if c.choices]
    texts = [text_of(c) for c in chunks]
    assert "".join(t or "" for t in texts) == whole
    if chat:  # the role's opening chunk, then the whole text with finish_reason
        chunks, texts = chunks[1:], texts[1:]
    assert texts == [whole] and chunks[0].finish_reason == "length"


def test_chat_sdk_sync_and_async(server, client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10,
                                           temperature=0)
    text = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and text
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 10

    async def streamed():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=CHAT, max_completion_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        again = await aclient.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10,
                                                      temperature=0)
        await aclient.close()
        return chunks, again

    chunks, again = asyncio.run(streamed())
    assert again.choices[0].message.content == text
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == text
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_many_prompts_n_logprobs_echo(server, client):
    out = client.completions.create(model=MODEL, prompt=["Hello", "Goodbye"], n=2, seed=1,
                                    max_tokens=4, temperature=0.8, logprobs=2, echo=True,
                                    extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text.startswith("Hello")
    lp = out.choices[2].logprobs  # echo: the prompt's 2 tokens are scored too
    assert len(lp.tokens) == 2 + 4 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(len(t) >= 2 for t in lp.top_logprobs[1:])
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert out.usage.completion_tokens == 16
    ids = client.completions.create(model=MODEL, prompt=[[19556, 905]], max_tokens=2, echo=True)
    assert ids.usage.prompt_tokens == 2 and ids.choices[0].text.startswith("Hello")
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, logprobs=True,
                                          top_logprobs=3, temperature=0)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and len(content[0].top_logprobs) == 3
    # Greedy picks the most likely token.
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)


def test_chat_logprob_bytes_are_the_tokens_own(server):
    """A token holding part of a character: `token` shows U+FFFD, `bytes` its own bytes (what
    a client joins to rebuild the character), streamed and whole alike."""
    from conftest import _smollm2_tokenizer

    first = _smollm2_tokenizer().encode("🎉")[0]  # the emoji's first bytes, not a character
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 1, "logprobs": True,
            "top_logprobs": 2, "logit_bias": {str(first): 100}}
    whole = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    entry = whole["choices"][0]["logprobs"]["content"][0]
    assert entry["token"] == "\ufffd"
    assert bytes(entry["bytes"]) == "🎉".encode()[: len(entry["bytes"])] and entry["bytes"]
    # the ranked entries (logprobs before the bias) spell their own tokens the same way
    assert all(bytes(e["bytes"]).decode(errors="replace") == e["token"]
               for e in entry["top_logprobs"])
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    streamed = [c["choices"][0]["logprobs"]["content"] for c in chunks
                if c["choices"] and c["choices"][0].get("logprobs")]
    assert [e["bytes"] for part in streamed for e in part] == [entry["bytes"]]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_choices_that_end_at_other_steps_end_once(server, path):
    """n > 1: a choice that ended sends its finish_reason (and stop_reason) once, not again each
    later step, and each choice's streamed text is its whole answer's."""
    body = {"model": MODEL, "n": 3, "temperature": 1.0, "seed": 3, "max_tokens": 12,
            "stop": [" "]}
    body.update({"prompt": "Hello"} if "chat" not in path else {"messages": CHAT})
    whole = httpx.post(server.url + path, json=body, timeout=60).json()["choices"]
    texts = {c["index"]: c.get("text", (c.get("message") or {}).get("content")) for c in whole}
    assert len({len(t) for t in texts.values()}) > 1  # the premise: they end at different steps
    finishes, streamed, stop_reasons = {}, {}, {}
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            for c in json.loads(line[6:])["choices"]:
                piece = c.get("text", (c.get("delta") or {}).get("content")) or ""
                streamed[c["index"]] = streamed.get(c["index"], "") + piece
                if c["finish_reason"] is not None:
                    finishes[c["index"]] = finishes.get(c["index"], 0) + 1
                    stop_reasons[c["index"]] = c["stop_reason"]
    assert finishes == {0: 1, 1: 1, 2: 1}
    assert streamed == texts
    # vLLM's stop_reason: the stop string that ended a choice, None for one that ran out
    reasons = {c["index"]: (c["finish_reason"], c["stop_reason"]) for c in whole}
    assert set(reasons.values()) <= {("stop", " "), ("length", None)}
    assert ("stop", " ") in reasons.values()
    assert stop_reasons == {i: r for i, (_, r) in reasons.items()}


@pytest.mark.parametrize("add_generation_prompt, role", [(True, "assistant"), (False, "user")])
def test_every_streamed_chat_choice_opens_with_the_answers_role(server, add_generation_prompt,
                                                                 role):
    """The first chunk of each of the n choices carries the role, the same as the whole
    answer's message: "assistant", or the last message's role when no generation prompt is
    added (vLLM's rule)."""
    body = {"model": MODEL, "messages": CHAT, "n": 2, "max_tokens": 2, "temperature": 0,
            "add_generation_prompt": add_generation_prompt}
    whole = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert [c["message"]["role"] for c in whole["choices"]] == [role, role]
    roles = {}
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    if "role" in c["delta"]:
                        roles.setdefault(c["index"], []).append(c["delta"]["role"])
    assert roles == {0: [role], 1: [role]}


def test_metrics_count_requests_once_and_only_what_runs(server):
    """n = 2 finishes one request (it had counted each completion, an abort one per request);
    beam search's tokens all come at its end: no time per token observed (it was 0); a
    constrained request refused by a 400 is not counted as constrained."""
    length = '{finish_reason="length"}'
    before = {name: server.metric(name, labels) for name, labels in (
        ("pagedserve_requests_finished_total", length),
        ("pagedserve_time_per_output_token_seconds_count", ""),
        ("pagedserve_structured_output_requests_total", ""))}

    def grown(name, labels=""):
        return server.metric(name, labels) - before[name]

    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "Hello", "n": 2, "max_tokens": 3, "ignore_eos": True,
        "temperature": 1.0, "seed": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "Hello", "n": 2, "best_of": 2, "use_beam_search": True,
        "max_tokens": 4, "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200
    r = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "Hello", "max_tokens": 10**6,
        "response_format": {"type": "json_object"}})
    assert r.status_code == 400
    server.wait_idle()
    assert grown("pagedserve_requests_finished_total", length) == 2  # one each
    assert grown("pagedserve_time_per_output_token_seconds_count") == 1  # the sampled one
    assert grown("pagedserve_structured_output_requests_total") == 0


def test_64_concurrent_requests_are_batched(server):
    steps_before = server.metric("pagedserve_engine_steps_total")

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            bodies = [{"model": MODEL, "prompt": f"Request number {i}:", "max_tokens": 8,
                       "temperature": 0, "ignore_eos": True} for i in range(64)]
            return await asyncio.gather(*(http.post("/v1/completions", json=b) for b in bodies))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 64
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in responses)
    steps = server.metric("pagedserve_engine_steps_total") - steps_before
    assert steps < 64 * 8 / 4, f"{steps} steps for 64 requests of 8 tokens: not batched"
    assert server.metric("pagedserve_max_num_requests_running") >= 16
    assert server.metric("pagedserve_batch_size_count") > 0
    server.wait_idle()


def test_client_disconnect_aborts(server):
    aborted = server.metric("pagedserve_requests_finished_total", '{finish_reason="abort"}')
    ttft = server.metric("pagedserve_time_to_first_token_seconds_count")
    body = {"model": MODEL, "prompt": "Count forever:", "max_tokens": 200, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.metric("pagedserve_kv_blocks_used") > 0
    server.wait_idle()
    # Non-streamed: the client gives up long before the 240 tokens are done (a CI machine once
    # made 200 of them within 0.3 s); the request itself reaches the server in milliseconds.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions",
                   json={**body, "stream": False, "max_tokens": 240}, timeout=0.1)
    server.wait_idle()
    after = server.metric("pagedserve_requests_finished_total", '{finish_reason="abort"}')
    assert after == aborted + 2
    # the stream had its first token before it was dropped: its time to first token counts
    # (the non-streamed one's, if its first token came within the 0.1 s)
    assert 1 <= server.metric("pagedserve_time_to_first_token_seconds_count") - ttft <= 2


def _finished(server, reason: str) -> float:
    """pagedserve_requests_finished_total for `reason` (0 before the first such request)."""
    match = re.search(rf'^pagedserve_requests_finished_total{{finish_reason="{reason}"}} (\S+)$',
                      httpx.get(server.url + "/metrics").text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize("path, body, most", [
    ("/v1/completions", {"prompt": ["Count forever:", "Go on:", "More:"]}, 3),
    ("/v1/chat/completions", {"messages": CHAT, "n": 4}, 1),
    ("/v1/chat/completions/batch", {"messages": [CHAT, [{"role": "user", "content": "Go on."}],
                                                 [{"role": "user", "content": "More."}]]}, 3),
], ids=["three prompts", "chat n=4", "batch of three"])
def test_a_dropped_non_streamed_call_ends_its_requests_as_aborts(server, path, body, most):
    """Every request of a call whose client left is aborted in the core (an n > 1 request is one
    request; prompts not yet sent are never sent): none of them runs on to its length."""
    aborted, ran = _finished(server, "abort"), _finished(server, "length")
    with pytest.raises(httpx.ReadTimeout):
        r = httpx.post(server.url + path, json={"model": MODEL, "max_tokens": 200,
                                                "ignore_eos": True, **body}, timeout=0.1)
        raise AssertionError(f"answered within 0.1 s: {r.status_code} {r.text[:200]}")
    server.wait_idle()
    assert _finished(server, "length") == ran
    assert 1 <= _finished(server, "abort") - aborted <= most


ERRORS = [  # (path, body, status, param)
    ("/v1/completions", b"{not json", 400, "body"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 2}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": 5}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[1, -2]]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [10**6]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"99999": 1}}, 400,
     "logit_bias"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "x"}]}, 400,
     "messages[0]"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [*CHAT, {"role": "user", "content": 5}]},
     400, "messages[1].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [*CHAT, {
        "role": "assistant", "content": None, "tool_calls": [{"function": "abc"}]}]}, 400,
     "messages[1].tool_calls[0].function"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [*CHAT, {
        "role": "assistant", "content": None, "tool_calls": [
            {"function": {"name": "f", "arguments": 5}}]}]}, 400,
     "messages[1].tool_calls[0].function.arguments"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [*CHAT, {
        "role": "assistant", "tool_calls": {"function": {}}}]}, 400, "messages[1].tool_calls"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "logprobs": True,
                              "top_logprobs": 30}, 400, "top_logprobs"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens"),
]


@pytest.mark.parametrize("path, body, status, param", ERRORS)
def test_errors_name_the_field(server, path, body, status, param):
    kwargs = ({"content": body, "headers": {"Content-Type": "application/json"}}
              if isinstance(body, bytes) else {"json": body})
    r = httpx.post(server.url + path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_length_size_and_queue_limits(server):
    post = lambda body: httpx.post(server.url + "/v1/completions", json=body)  # noqa: E731
    long_prompt = [100] * 300
    r = post({"model": MODEL, "prompt": long_prompt})
    assert r.status_code == 400 and "256" in r.text and "300" in r.text
    r = post({"model": MODEL, "prompt": [100] * 250, "max_tokens": 10})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = post({"model": MODEL, "prompt": "x" * (5 * 1024 * 1024)})
    assert r.status_code == 413
    settings = server.app.state.settings
    engine = server.app.state.engine
    settings.max_waiting_requests = 1
    engine.admitting += 1  # one request on its way in: the queue is full
    try:
        r = post({"model": MODEL, "prompt": "hi"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_requests"
    finally:
        settings.max_waiting_requests = None
        engine.admitting -= 1
    assert httpx.get(server.url + "/health").status_code == 200
    server.wait_idle()


def _make_failing_core():
    """A core whose step raises, as a CUDA error would, once it holds two requests."""
    core = _make_core()
    real_step = core.step

    def step():
        if core.scheduler.num_running + core.scheduler.num_waiting == 2:
            raise RuntimeError("simulated device fault")
        return real_step()

    core.step = step
    return core


def test_core_fault_fails_requests_in_flight_naming_the_cause():
    causes = []
    s = Server(create_app(served_model_name=MODEL, make_core=_make_failing_core,
                          on_fatal=causes.append))
    try:
        def streamed():
            body = {"model": MODEL, "messages": CHAT, "stream": True, "max_tokens": 200,
                    "ignore_eos": True}
            return httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30)

        with concurrent.futures.ThreadPoolExecutor() as pool:
            stream = pool.submit(streamed)
            whole = httpx.post(s.url + "/v1/completions", timeout=30,
                               json={"model": MODEL, "prompt": "hi", "max_tokens": 200,
                                     "ignore_eos": True})
            events = [line for line in stream.result().text.splitlines() if line]
        assert whole.status_code == 500
        error = whole.json()["error"]
        assert error["type"] == "server_error" and "simulated device fault" in error["message"]
        # Streamed: the headers are out already, so the fault arrives as an error event.
        assert "simulated device fault" in events[-2] and events[-1] == "data: [DONE]"
        health = httpx.get(s.url + "/health")
        assert health.status_code == 503 and "simulated device fault" in health.text
        assert len(causes) == 1 and "simulated device fault" in causes[0]
        assert s.metric("pagedserve_requests_finished_total", '{finish_reason="error"}') == 2
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    finally:
        s.stop()


def _make_core_failing_at_abort():
    """A core whose abort_requests raises: a failure outside the step (and whose steps take
    20 ms, so that a request of 200 tokens is still running when another is aborted)."""
    core = _make_core()
    step = core.step

    def abort_requests(request_ids):
        raise KeyError("simulated bookkeeping fault")

    def slow_step():
        time.sleep(0.02)
        return step()

    core.abort_requests, core.step = abort_requests, slow_step
    return core


def test_a_core_failing_outside_its_step_fails_requests_naming_the_cause():
    """Before: the core process exited 1 with no traceback, and requests read only "exited with
    code 1"."""
    causes = []
    s = Server(create_app(served_model_name=MODEL, make_core=_make_core_failing_at_abort,
                          on_fatal=causes.append))
    try:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 200, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor() as pool:
            whole = pool.submit(httpx.post, s.url + "/v1/completions", json=body, timeout=30)
            with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True},
                              timeout=30) as r:
                next(r.iter_lines())  # the stream runs; leaving it aborts the request
            answer = whole.result()
        assert answer.status_code == 500, answer.text
        message = answer.json()["error"]["message"]
        assert "the engine core failed: KeyError" in message and "simulated bookkeeping" in message
        assert len(causes) == 1 and "simulated bookkeeping fault" in causes[0]
        assert httpx.get(s.url + "/health").status_code == 503
    finally:
        s.stop()


def _make_flaky_core():
    """A core whose stop check fails for requests of max_tokens 7 at their second token (the core
    process is this test's alone, so patching its module is safe)."""
    import engine.core_postprocess as core_module

    check_stop = core_module.check_stop_ids

    def flaky(seq, *a):
        if seq.sampling_params.max_tokens == 7 and seq.num_output_tokens == 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return check_stop(seq, *a)

    core_module.check_stop_ids = flaky
    return _make_core()


def test_one_failing_request_gets_500_naming_the_cause_and_others_go_on():
    s = Server(create_app(served_model_name=MODEL, make_core=_make_flaky_core))
    body = {"model": MODEL, "prompt": "hi", "ignore_eos": True}
    results = {}

    def post(name, max_tokens):
        results[name] = httpx.post(s.url + "/v1/completions", timeout=30,
                                   json={**body, "max_tokens": max_tokens})

    try:
        threads = [threading.Thread(target=post, args=a) for a in (("bad", 7), ("good", 12))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bad, good = results["bad"], results["good"]
        assert bad.status_code == 500 and "injected" in bad.json()["error"]["message"]
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 12
        s.wait_idle()
        assert httpx.get(s.url + "/health").status_code == 200  # the core goes on
    finally:
        s.stop()


def test_models_tokenize_detokenize(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert (card.id, card.object, card.max_model_len) == (MODEL, "model", MAX_MODEL_LEN)
    with pytest.raises(openai.NotFoundError, match="'org/other' does not exist"):
        client.models.retrieve("org/other")
    missing = httpx.get(server.url + "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/completions").status_code == 405
    r = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] == MAX_MODEL_LEN
    assert r["token_strs"] is None  # vLLM's: the vocabulary's spellings, when asked for
    spelled = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world",
                                                         "return_token_strs": True}).json()
    assert spelled["tokens"] == r["tokens"] and spelled["token_strs"] == ["Hello", "\u0120world"]
    # vLLM's GET /tokenizer_info (--enable-tokenizer-info-endpoint): tokens, template, limit
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert (info["eos_token"], info["model_max_length"]) == ("<|im_end|>", MAX_MODEL_LEN)
    assert info["chat_template"].startswith("{%") and info["tokenizer_class"]
    assert info["added_tokens_decoder"]["2"] == {"content": "<|im_end|>", "special": True}
    off = create_app(served_model_name=MODEL, make_core=_make_core)  # off by default
    assert "/tokenizer_info" not in {r.path for r in off.routes}
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == "Hello world"
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1, 2]})):
        other = httpx.post(server.url + path, json={"model": "nope", **body})  # as vLLM
        assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    named = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": r["tokens"]})
    assert named.json()["prompt"] == "Hello world"
    chat = httpx.post(server.url + "/tokenize", json={"messages": CHAT}).json()
    text = httpx.post(server.url + "/detokenize", json={"tokens": chat["tokens"]}).json()
    assert "<|im_start|>user\nTell me a story.<|im_end|>" in text["prompt"]
    assert text["prompt"].endswith("<|im_start|>assistant\n")


def test_per_request_metrics(server):
    """vLLM's --enable-per-request-metrics: a whole answer, and a stream's closing usage chunk
    alone, carry the request's timings (mean inter-token latency only past one token)."""
    chat = {"model": MODEL, "messages": CHAT, "max_tokens": 4, "ignore_eos": True}
    whole = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=60).json()
    m = whole["metrics"]
    assert set(m) == {"time_to_first_token_ms", "generation_time_ms", "queue_time_ms",
                      "mean_itl_ms", "tokens_per_second"}
    assert all(v >= 0 for v in m.values()) and m["tokens_per_second"] > 0
    assert m["mean_itl_ms"] == pytest.approx(m["generation_time_ms"] / 3)
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={**chat, "max_tokens": 1, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    assert all("metrics" not in c for c in chunks[:-1]) and chunks[-1]["choices"] == []
    assert "mean_itl_ms" not in chunks[-1]["metrics"]
    assert chunks[-1]["metrics"]["time_to_first_token_ms"] >= 0
    # n choices decode side by side: the latency between a choice's tokens, not the time over
    # all choices' tokens (it came out n times too small)
    two = httpx.post(server.url + "/v1/chat/completions", json={**chat, "n": 2},
                     timeout=60).json()["metrics"]
    assert two["mean_itl_ms"] == pytest.approx(two["generation_time_ms"] / 3)
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={**chat, "n": 2, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        last = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")][-1]
    assert last["usage"]["completion_tokens"] == 8
    assert last["metrics"]["mean_itl_ms"] == pytest.approx(
        last["metrics"]["generation_time_ms"] / 3)


def test_api_key_and_default_bind():
    # The guard answers before the engine is involved, so no engine is ever loaded here.
    app = create_app(api_key="sekret", make_core=_make_core)

    async def calls():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            good = {"Authorization": "Bearer sekret"}
            return [
                (await http.get("/v1/models")).status_code,
                (await http.get("/v1/models", headers={"Authorization": "Bearer nope"}))
                .status_code,
                (await http.post("/v1/completions", json={})).json()["error"]["code"],
                (await http.get("/v1/models", headers=good)).status_code,  # passes: still loading
                (await http.get("/health")).status_code,
                (await http.get("/metrics")).status_code,
            ]

    assert asyncio.run(calls()) == [401, 401, "invalid_api_key", 503, 503, 200]
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, None)



def test_a_handler_bug_is_a_500_and_the_connection_keeps_serving(server, monkeypatch):
    """An unexpected error in a handler: an OpenAI-style 500 naming it, and the next request on
    the same keep-alive connection is served (Starlette re-raises after its 500, and uvicorn
    then drops the connection)."""
    import socket

    from server import openai_routes

    def broken(request, body):
        raise RuntimeError("a bug in a handler")

    monkeypatch.setattr(openai_routes, "completions_body", broken)
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "prompt": "hi"}).encode()
    first = (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
             b"application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
             + body)
    second = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(first)
        reply = _http_response(sock)
        assert reply.startswith(b"HTTP/1.1 500") and b"a bug in a handler" in reply, reply[:300]
        assert b'"type":"server_error"' in reply.replace(b" ", b"")
        sock.sendall(second)
        assert _http_response(sock).startswith(b"HTTP/1.1 200"), "the connection was dropped"


def _http_response(sock) -> bytes:
    """One HTTP/1.1 response with a Content-Length from the socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


def test_answers_validate_strictly_against_the_openai_types(server):
    """Every chat answer and chunk, and each completions answer, parses under the openai SDK's
    own types in pydantic's strict mode: the SDK itself builds them without validating, so a
    field of the wrong type (a float `created`, a string `index`, a missing `tool_calls[].type`)
    would pass its tests unseen. (Completions chunks are left out: the SDK's Completion has no
    null finish_reason, which OpenAI's own stream sends until the last chunk.)"""
    import httpx
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    # enum arguments: the tiny random model finishes a forced call within max_tokens
    tools = [{"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {arg: {"enum": ["a", "b"]}}, "required": [arg],
        "additionalProperties": False}}}
        for name, arg in (("get_weather", "city"), ("get_time", "tz"))]
    chat = {"model": MODEL, "messages": CHAT, "max_tokens": 40}
    bodies = [{**chat, "logprobs": True, "top_logprobs": 3, "n": 2, "temperature": 1},
              {**chat, "stop": ["e"], "temperature": 0},
              {**chat, "tools": tools, "tool_choice": "required", "parallel_tool_calls": False},
              {**chat, "tools": tools, "logprobs": True,
               "tool_choice": {"type": "function", "function": {"name": "get_time"}}}]
    reasons, calls = set(), 0
    for body in bodies:
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        answer = ChatCompletion.model_validate_json(r.text, strict=True)
        reasons |= {c.finish_reason for c in answer.choices}
        calls += sum(len(c.message.tool_calls or ()) for c in answer.choices)
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=stream,
                          timeout=60) as r:
            lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]" and len(lines) > 2
        chunks = [ChatCompletionChunk.model_validate_json(line, strict=True)
                  for line in lines[:-1]]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert calls >= 2 and "tool_calls" in reasons, (calls, reasons)  # the calls were checked
    for body in ({"logprobs": 3, "n": 2, "temperature": 1}, {"echo": True, "max_tokens": 4}):
        r = httpx.post(server.url + "/v1/completions",
                       json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6,
                             **body}, timeout=60)
        answer = Completion.model_validate_json(r.text, strict=True)
        assert answer.usage.completion_tokens > 0


def test_a_stream_whose_tokens_write_no_text_still_ends_with_its_finish_reason(client):
    """Every token is eos (skipped: no text) until max_tokens: the steps before the last send
    nothing, the last still sends its choice with finish_reason "length" (CompletionOutput.
    finished holds for every finish reason, not only "stop")."""
    body = dict(model=MODEL, max_tokens=2, temperature=0, stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True, "logit_bias": {"2": 100}})
    chunks = list(client.completions.create(prompt=[5, 6, 7], **body))
    assert [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks if c.choices] == [
        ("", "length")]
    assert chunks[-1].usage.completion_tokens == 2
    chunks = list(client.chat.completions.create(messages=CHAT, **body))
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, "length"]
    assert chunks[-1].usage.completion_tokens == 2


def test_several_served_model_names_as_vllm():
    """--served-model-name A B (vLLM's): requests may send either name, answers carry the
    first, /v1/models lists both; any other is a 404 naming them."""
    assert build_parser().parse_args(["serve", "m", "--served-model-name", "a", "b"]) \
        .served_model_name == ["a", "b"]
    with Server(create_app(served_model_name=["first", "alias", "first", "alias"],
                           make_core=_make_core)) as s:
        for name in ("first", "alias"):
            r = httpx.post(s.url + "/v1/completions", json={
                "model": name, "prompt": "Hi", "max_tokens": 2}, timeout=60)
            assert r.status_code == 200 and r.json()["model"] == "first", r.text
            card = httpx.get(s.url + f"/v1/models/{name}").json()
            assert card["id"] == name
        listed = httpx.get(s.url + "/v1/models").json()["data"]
        assert [m["id"] for m in listed] == ["first", "alias"]
        other = httpx.post(s.url + "/v1/completions", json={"model": "nope", "prompt": "Hi"})
        assert other.status_code == 404
        assert "'first' or 'alias'" in other.json()["error"]["message"]


def test_a_chat_template_given_to_the_server_renders_every_chat():
    """--chat-template: chats (with tools too) render with the given template, not the model's;
    /tokenizer_info shows it."""
    template = ("{% for m in messages %}<|im_start|>[{{ m.role }}] {{ m.content }}"
                "{% endfor %}{% if tools %}TOOLS{% endif %}")
    with Server(create_app(served_model_name=MODEL, make_core=_make_core,
                           enable_tokenizer_info_endpoint=True, chat_template=template)) as s:
        tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
        for extra, tail in (({}, ""), ({"tools": [tool]}, "TOOLS")):
            ids = httpx.post(s.url + "/tokenize", json={"messages": CHAT, **extra}).json()
            text = httpx.post(s.url + "/detokenize", json={"tokens": ids["tokens"]}).json()
            assert text["prompt"] == "<|im_start|>[user] Tell me a story." + tail
            chat = httpx.post(s.url + "/v1/chat/completions", json={
                "model": MODEL, "messages": CHAT, "max_tokens": 1, **extra}, timeout=60).json()
            assert chat["usage"]["prompt_tokens"] == ids["count"]
        info = httpx.get(s.url + "/tokenizer_info").json()
        assert info["chat_template"] == template
