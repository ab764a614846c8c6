"""A stream whose client stops reading (server/async_engine.RequestGroup): a real uvicorn on a
loopback port whose sockets have a small send buffer, so that the stream stalls after some 100 KB;
the engine runs the request to its end meanwhile. The API process then holds one output for the
request (not one per step, each with a copy of the text so far), and the stream, read late, says
what it says when read at once, in fewer chunks."""

import json
import random
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from conftest import tiny_server_core  # noqa: E402
from test_server import Server  # noqa: E402

from server.app import create_app  # noqa: E402

MODEL = "tiny"
FINISHED = "pagedserve_requests_finished_total"


class SmallBufferServer(Server):
    """Server's helpers, on a port of 19200-19299 whose accepted sockets (they inherit it from
    the listening one) send through a 4 KB buffer."""

    def __init__(self, app):
        self.app = app
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        for port in random.sample(range(19200, 19300), 100):
            try:
                listener.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        else:
            pytest.skip("no free port in 19200..19299")
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [listener]},
                                       daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server():
    # No prefix cache: the second request's usage would count the first one's prompt as cached.
    with SmallBufferServer(create_app(served_model_name=MODEL, make_core=tiny_server_core(
            max_num_seqs=4, max_model_len=512, num_kv_blocks=128,
            enable_prefix_caching=False))) as s:
        yield s


def _num_finished(server) -> float:
    return sum(server.metric(FINISHED, f'{{finish_reason="{r}"}}')
               for r in ("stop", "length", "abort", "error"))


def _stream(server, path: str, body: dict, stall: bool) -> tuple[list[dict], int | None]:
    """The SSE events of a streamed call, read at once, or (`stall`) only once the engine has
    finished its request; with `stall`, also how many outputs the API process held for it then."""
    host, port = server.url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    engine = server.app.state.engine
    finished = _num_finished(server)
    group = num_held = None
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(60)
        s.connect((host, int(port)))
        s.sendall(head + data)
        if stall:
            deadline = time.time() + 60
            while _num_finished(server) == finished:
                group = group or next(iter(list(engine._groups.values())), None)
                assert time.time() < deadline, "the request did not finish"
                time.sleep(0.05)
            num_held = len(group._items)
        received = b""
        while chunk := s.recv(1 << 16):
            received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    stream = b""
    while True:  # the chunked body
        size, _, rest = rest.partition(b"\r\n")
        if int(size, 16) == 0:
            break
        stream, rest = stream + rest[: int(size, 16)], rest[int(size, 16) + 2 :]
    *events, done = [e for e in stream.decode().split("\n\n") if e]
    assert done == "data: [DONE]"
    return [json.loads(e.removeprefix("data: ")) for e in events], num_held


def _choices(events: list[dict]) -> dict:
    """Per choice index, everything the stream said of it, joined (completions or chat)."""
    joined = {}
    for event in events:
        for c in event["choices"]:
            j = joined.setdefault(c["index"], {"text": "", "token_ids": [], "logprobs": [],
                                               "finish_reason": []})
            j["text"] += c["text"] if "text" in c else c["delta"].get("content", "")
            j["token_ids"] += c.get("token_ids", [])
            lps = c["logprobs"]
            if lps is not None and "content" in lps:  # chat: one entry per token
                j["logprobs"] += lps["content"]
            elif lps is not None:  # completions: one list per field
                j["logprobs"] += zip(lps["tokens"], lps["token_logprobs"], lps["top_logprobs"],
                                     lps["text_offset"], strict=True)
            if c["finish_reason"] is not None:
                j["finish_reason"].append((c["finish_reason"], c["stop_reason"]))
    return joined


BODIES = {
    "/v1/completions": {"prompt": "Once upon a time", "logprobs": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Once upon a time"}],
                             "logprobs": True, "top_logprobs": 2},
}


@pytest.mark.parametrize("path", BODIES)
def test_a_stalled_stream_holds_one_output_and_reads_as_one_read_at_once(server, path):
    # A stop string that holds text back at its prefixes but never ends a choice: one that ended
    # would run on in the core until the front's word reaches it, for as many steps as that takes,
    # and so change the others' float sums (their logprobs) from one run to the next.
    body = {"model": MODEL, "n": 3, "max_tokens": 160, "ignore_eos": True, "seed": 7,
            "return_token_ids": True, "stop": ["the cat sat on the mat"], "stream": True,
            "stream_options": {"include_usage": True}, **BODIES[path]}
    at_once, _ = _stream(server, path, body, stall=False)
    late, num_held = _stream(server, path, body, stall=True)
    assert num_held == 1  # one output for every step the stream missed
    assert len(late) < len(at_once) / 2  # most of them merged into a few chunks
    choices = _choices(at_once)
    assert _choices(late) == choices
    assert sorted(choices) == [0, 1, 2]
    assert all(c["finish_reason"] == [("length", None)] for c in choices.values())
    assert all(len(c["logprobs"]) == len(c["token_ids"]) == 160 for c in choices.values())
    if path == "/v1/completions":  # some tokens went out with their text held back
        assert any(c["text"] == "" and c["token_ids"] for e in at_once for c in e["choices"])
    assert late[-1]["usage"] == at_once[-1]["usage"] and late[-1]["choices"] == []
    assert late[-1]["usage"]["completion_tokens"] == sum(
        len(c["token_ids"]) for c in choices.values())
    server.wait_idle()
