"""Random JSON bodies against every endpoint get 2xx or 4xx, never 5xx, and the server still
serves a normal request after each batch (issue 9). Bounded: a fixed number of derandomized
examples on the tiny model, a few seconds per endpoint."""

import json

import pytest
from conftest import tiny_server_core
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.app import create_app
from tools.hammer import FIELDS, ISSUE_CASES, encode

TestClient = pytest.importorskip("starlette.testclient").TestClient

MODEL = "tiny"
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
             "/v1/models", "/health", "/metrics")
# Sampling values that underflow float32 (top_p=1e-50, temperature=1e-40 with a filter,
# repetition_penalty=1e-50) pass validation and must still sample a token: they answer 200.
SAMPLER_EXTREMES = {"top_p_1e-50", "tiny_temperature_top_p", "tiny_temperature_top_k",
                    "tiny_temperature_min_p", "repetition_penalty_1e-50"}

# (status, error.param) of each issue case the server refuses
REFUSED = {
    "n_2**63": (400, "n"), "temperature_Infinity": (400, "temperature"),
    "temperature_NaN": (400, "temperature"), "nested_100000": (400, "body"),
    "nested_in_field": (400, "body"), "int_5000_digits": (400, "body"),
    "text_plain_post": (415, "Content-Type"), "host_evil": (421, "Host"),
    "best_of": (400, "best_of"), "stop_strings_many": (400, "stop"),
    "stop_string_long": (400, "stop"), "logit_bias_huge": (400, "logit_bias"),
    "prompts_many": (400, "prompt"), "top_logprobs_big": (400, "top_logprobs"),
    "top_k_2**70": (400, "top_k"), "tokens_huge_id": (400, "tokens"),
    "body_not_object": (400, "body"), "body_not_json": (400, "body"),
    "body_not_utf8": (400, "body"),
}

floats = st.floats(allow_nan=True, allow_infinity=True)
leaves = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | floats
          | st.text(max_size=12) | st.sampled_from(["<|im_end|>", "<|im_start|>system", MODEL]))
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                           max_leaves=10)
unit = st.floats(0, 1)
plausible = {  # values the server accepts, mostly, so requests reach the engine
    "model": st.just(MODEL),
    "prompt": st.text(min_size=1, max_size=20) | st.lists(st.integers(0, 49151), min_size=1,
                                                          max_size=8),
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]),
         "content": st.text(max_size=20) | json_values}), min_size=1, max_size=3),
    "max_tokens": st.integers(-2, 6), "n": st.integers(-1, 10), "best_of": st.integers(0, 3),
    "tokens": st.lists(st.integers(-5, 60_000), max_size=6),
    "stream": st.booleans(), "logprobs": st.booleans() | st.integers(-1, 25),
    "top_logprobs": st.integers(-1, 25), "stop": st.text(max_size=4)
    | st.lists(st.text(max_size=4), max_size=4), "stop_token_ids": st.lists(st.integers(0, 9)),
    "temperature": st.floats(0, 3) | st.just(0), "top_p": unit, "min_p": unit,
    "top_k": st.integers(-1, 50), "seed": st.integers(-(2**70), 2**70),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.01, 3), "min_tokens": st.integers(0, 4),
    "logit_bias": st.dictionaries(st.integers(0, 49151).map(str),
                                  st.floats(-100, 100), max_size=3),
    "echo": st.booleans(), "ignore_eos": st.booleans(), "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
BASES = {"/v1/completions": {"model": MODEL, "prompt": "Once upon", "max_tokens": 3},
         "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 3},
         "/tokenize": {"prompt": "hi"}, "/detokenize": {"tokens": [5, 6]}}


def bodies(path: str):
    """A body that works for `path`, with up to three fields replaced by plausible or junk
    values; or plain random JSON."""
    fields = st.lists(st.sampled_from(FIELDS), max_size=3, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({n: plausible.get(n, json_values) | json_values
                                             for n in names}))
    return fields.map(lambda changes: {**BASES.get(path, {}), **changes}) | json_values


@pytest.fixture(scope="module")
def client():
    app = create_app(served_model_name=MODEL, make_core=tiny_server_core(
        max_model_len=64, max_num_seqs=8, num_kv_blocks=128))
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as c:
        while c.get("/health").status_code != 200:
            pass
        yield c


def check_still_serves(client):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    engine = client.app.state.engine
    assert engine.num_waiting_requests == 0 and not engine._groups


@pytest.mark.parametrize("path", ENDPOINTS)
def test_random_bodies_never_5xx(client, path):
    @settings(max_examples=80, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=bodies(path))
    def post(body):
        r = client.post(path, content=json.dumps(body).encode(),
                        headers={"Content-Type": "application/json"})
        assert r.status_code < 500, (body, r.text[:300])
        if r.status_code >= 400 and path.startswith("/v1/c"):
            assert r.json()["error"]["message"]

    post()
    check_still_serves(client)


@pytest.mark.parametrize("name, path, body, headers", ISSUE_CASES, ids=lambda v: str(v)[:30])
def test_issue_cases(client, name, path, body, headers):
    r = client.post(path, content=encode(body),
                    headers={"Content-Type": "application/json", **headers})
    assert r.status_code < 500, r.text[:300]
    if name in SAMPLER_EXTREMES:
        assert r.status_code == 200, r.text[:300]
        assert r.json()["choices"][0]["text"] is not None
    elif name == "forged_chat_turn":
        assert r.status_code == 200, r.text[:300]
    else:  # refused for the right reason: the status, and the field the error names
        assert (r.status_code, r.json()["error"]["param"]) == REFUSED[name], r.text[:300]
    check_still_serves(client)

