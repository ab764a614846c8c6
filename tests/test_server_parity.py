"""vLLM's extensions to the OpenAI API (server/extras.py) end to end, on the tiny model with the
real SmolLM2 tokenizer: prompt scoring, truncation, token ids, usage details, chat prefill,
/invocations and /load."""

import concurrent.futures
import json

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from conftest import _smollm2_tokenizer  # noqa: E402
from test_server import MODEL, Server, _make_core, sdk_client  # noqa: E402

from engine import SamplingParams  # noqa: E402
from engine.output_processor import bad_words_token_ids  # noqa: E402
from server.app import create_app  # noqa: E402
from server.extras import chat_options  # noqa: E402
from server.protocol import APIError  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def server():
    with Server(create_app(served_model_name=MODEL, make_core=_make_core,
                           enable_server_load_tracking=True)) as s:
        yield s


@pytest.fixture
def client(server):
    return sdk_client(server)


def post(server, path, body):
    return httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=60)


def test_echo_logprobs_score_the_prompt(server, client):
    prompt_ids = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1,
                                           extra_body={"return_token_ids": True})
    num_prompt = len(prompt_ids.choices[0].prompt_token_ids)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                    echo=True, logprobs=2, extra_body={"ignore_eos": True})
    c = out.choices[0]
    lp = c.logprobs
    assert c.text.startswith(PROMPT)
    assert len(lp.tokens) == num_prompt + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert all(2 <= len(t) <= 3 for t in lp.top_logprobs[1:])
    # Offsets run over the prompt from 0, then the generated text from the prompt's end.
    assert lp.text_offset[0] == 0 and lp.text_offset[num_prompt] == len(PROMPT)
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == sorted(lp.text_offset)
    # max_tokens 0: the same prompt scores, nothing generated.
    scored = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True,
                                       logprobs=2)
    s = scored.choices[0]
    assert s.text == PROMPT and scored.usage.completion_tokens == 0
    assert s.logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:num_prompt],
                                                           abs=1e-5)
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_carry_the_offsets_of_the_whole_text(client, echo):
    """A stream's text_offset runs on from chunk to chunk (each choice its own) as in the
    non-streamed answer: from the prompt's end when it is echoed, else from 0."""
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, n=2, logprobs=1,
                echo=echo, extra_body={"ignore_eos": True})
    whole = client.completions.create(**args).choices[0].logprobs
    streamed = {0: [], 1: []}
    for chunk in client.completions.create(stream=True, **args):
        for c in chunk.choices:
            if c.logprobs is not None:
                streamed[c.index] += list(zip(c.logprobs.tokens, c.logprobs.text_offset,
                                              strict=True))
    assert streamed[0] == streamed[1]  # greedy: two equal choices, counted apart
    assert streamed[0] == list(zip(whole.tokens, whole.text_offset, strict=True))
    assert whole.text_offset[-1] > (len(PROMPT) if echo else 0)


@pytest.mark.parametrize("stream", [False, True])
def test_echo_offsets_never_run_backwards_over_a_multibyte_prompt(client, stream):
    """A prompt whose tokens hold parts of characters (each token's text a U+FFFD): the echoed
    prompt's offsets count those texts, so the generated tokens' offsets run on from there, not
    from the prompt's length in characters (which would send them backwards)."""
    args = dict(model=MODEL, prompt="\U0001f600\U0001f600 \u65e5\u672c", max_tokens=4,
                temperature=0, logprobs=0, echo=True, extra_body={"ignore_eos": True})
    tokens, offsets = [], []
    if stream:
        for chunk in client.completions.create(stream=True, **args):
            for c in chunk.choices:
                if c.logprobs is not None:
                    tokens += c.logprobs.tokens
                    offsets += c.logprobs.text_offset
    else:
        lp = client.completions.create(**args).choices[0].logprobs
        tokens, offsets = lp.tokens, lp.text_offset
    assert offsets == sorted(offsets), offsets
    steps = [b - a for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    assert steps == [len(t) for t in tokens[:-1]]


def test_scoring_generated_text_gives_the_samplers_logprobs(client):
    gen = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                    logprobs=0, extra_body={"ignore_eos": True,
                                                            "return_token_ids": True})
    g = gen.choices[0]
    ids = g.prompt_token_ids + g.token_ids
    scored = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True,
                                       logprobs=0)
    got = scored.choices[0].logprobs.token_logprobs[len(g.prompt_token_ids):]
    assert got == pytest.approx(g.logprobs.token_logprobs, abs=1e-4)


def test_prompt_logprobs_on_completions_and_chat(server, client):
    out = client.completions.create(model=MODEL, prompt=[PROMPT, "Hello there"], max_tokens=2,
                                    extra_body={"prompt_logprobs": 1, "return_token_ids": True})
    for c in out.choices:
        assert len(c.prompt_logprobs) == len(c.prompt_token_ids)
        assert c.prompt_logprobs[0] is None
        for tid, entry in zip(c.prompt_token_ids[1:], c.prompt_logprobs[1:], strict=True):
            assert str(tid) in entry and 1 <= len(entry) <= 2
            assert {"logprob", "rank", "decoded_token"} <= set(entry[str(tid)])
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1)
    assert plain.choices[0].prompt_logprobs is None
    chat = post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "prompt_logprobs": 0,
        "return_token_ids": True}).json()
    assert len(chat["prompt_logprobs"]) == len(chat["prompt_token_ids"]) > 3
    assert chat["prompt_logprobs"][0] is None
    assert len(chat["choices"][0]["token_ids"]) == chat["usage"]["completion_tokens"]
    r = post(server, "/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"


def test_streamed_echo_carries_the_prompt_scores(client):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, echo=True,
                                            logprobs=1, stream=True))
    first = chunks[0].choices[0]
    assert first.text == PROMPT and first.logprobs.token_logprobs[0] is None
    assert len(first.logprobs.tokens) > 5
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.startswith(PROMPT)


def test_streamed_echo_with_token_ids_opens_with_the_prompts_ids(server):
    """With return_token_ids, every chunk of a choice carries its token_ids, the echoed opening
    one too (none of the output's yet), so a client can add up the chunks' ids."""
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "echo": True}
    whole = post(server, "/v1/completions", body).json()["choices"][0]
    r = post(server, "/v1/completions", {**body, "stream": True})
    choices = [json.loads(line[6:])["choices"][0] for line in r.text.splitlines()
               if line.startswith("data: {")]
    first = choices[0]
    assert first["text"] == PROMPT and first["token_ids"] == []
    assert first["prompt_token_ids"] == whole["prompt_token_ids"]
    assert all("prompt_token_ids" not in c for c in choices[1:])
    assert [i for c in choices for i in c["token_ids"]] == whole["token_ids"]
    assert len(whole["token_ids"]) == 3


def test_continuous_usage_counts_each_choice_alone(client):
    """As vLLM: with n > 1 and several prompts, a chunk's usage is its own choice's prompt and
    tokens so far; only the closing chunk sums the call."""
    prompts = [[100, 101, 102], [103, 104, 105, 106, 107]]
    chunks = list(client.completions.create(
        model=MODEL, prompt=prompts, n=2, max_tokens=3, stream=True,
        extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    seen, last = {}, {}
    for c in chunks[:-1]:
        (choice,) = c.choices
        u = c.usage
        assert u.prompt_tokens == len(prompts[choice.index // 2]), (choice.index, u)
        assert u.completion_tokens >= seen.get(choice.index, 1)
        seen[choice.index] = u.completion_tokens
        if choice.finish_reason is not None:
            last[choice.index] = u.completion_tokens
    assert last == {0: 3, 1: 3, 2: 3, 3: 3}
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (8, 12)


def test_usage_every_chunk_and_cached_tokens(client):
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = list(stream)
    for c in chunks:
        u = c.usage
        assert u.completion_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    quiet = list(client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=2, stream=True,
        stream_options={"include_usage": False, "continuous_usage_stats": True}))
    assert all(c.usage is None for c in quiet)
    long_ids = [100 + i for i in range(40)]  # 2 full blocks of 16 come back from the cache
    first = client.completions.create(model=MODEL, prompt=long_ids, max_tokens=1)
    again = client.completions.create(model=MODEL, prompt=long_ids, max_tokens=1)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 32
    # vLLM's created_cache_tokens: the prompt tokens a request wrote to the cache (its full
    # blocks, 32 of 40 tokens, less what it found there)
    assert first.usage.prompt_tokens_details.created_cache_tokens == 32
    assert again.usage.prompt_tokens_details.created_cache_tokens == 0
    exact = [200 + i for i in range(32)]  # the cache never serves a prompt's last block
    runs = [client.completions.create(model=MODEL, prompt=exact, max_tokens=1).usage
            .prompt_tokens_details for _ in range(2)]
    assert [(d.cached_tokens, d.created_cache_tokens) for d in runs] == [(0, 32), (16, 16)]
    # vLLM's cache_salt: a salted request finds none of the unsalted blocks, then its own
    for salt, cached in (("tenant-a", 0), ("tenant-a", 32), ("tenant-b", 0)):
        salted = client.completions.create(model=MODEL, prompt=long_ids, max_tokens=1,
                                           extra_body={"cache_salt": salt})
        assert salted.usage.prompt_tokens_details.cached_tokens == cached, salt
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=long_ids, max_tokens=1,
                                  extra_body={"cache_salt": "a/b"})
    assert "cache_salt" in str(e.value)
    # a chat's usage counts the cache the same way: the same conversation twice finds the full
    # blocks of its templated prompt (all but the last block) the second time (a salt of its
    # own, so the chat template's opening that earlier chats cached is not found the first time)
    messages = [{"role": "user", "content": "Tell me about block tables. " * 8}]
    chats = [client.chat.completions.create(model=MODEL, max_tokens=1, messages=messages,
                                            extra_body={"cache_salt": "chat-usage"}).usage
             for _ in range(2)]
    n = chats[0].prompt_tokens
    full = (n - 1) // 16 * 16
    assert n > 32 and chats[1].prompt_tokens == n
    assert [(u.prompt_tokens_details.cached_tokens, u.prompt_tokens_details.created_cache_tokens)
            for u in chats] == [(0, n // 16 * 16), (full, n // 16 * 16 - full)]


def test_truncate_prompt_tokens(server, client):
    ids = [100 + i for i in range(300)]  # longer than max_model_len 256
    left = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, extra_body={
        "truncate_prompt_tokens": 10, "return_token_ids": True})
    assert left.usage.prompt_tokens == 10 and left.choices[0].prompt_token_ids == ids[-10:]
    right = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, extra_body={
        "truncate_prompt_tokens": 10, "truncation_side": "right", "return_token_ids": True})
    assert right.choices[0].prompt_token_ids == ids[:10]
    # -1: the longest prompt the model takes, room left for the one token asked for
    longest = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, extra_body={
        "truncate_prompt_tokens": -1, "return_token_ids": True})
    assert longest.choices[0].prompt_token_ids == ids[-255:]
    assert longest.usage.completion_tokens == 1
    text = client.completions.create(model=MODEL, prompt=PROMPT * 80, max_tokens=1,
                                     extra_body={"truncate_prompt_tokens": 20})
    assert text.usage.prompt_tokens == 20
    for body, param in (({"truncate_prompt_tokens": 256}, "truncate_prompt_tokens"),
                        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
                        ({"truncation_side": "middle"}, "truncation_side")):
        r = post(server, "/v1/completions", {"prompt": ids, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_return_token_ids_match_the_text(server, client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=0,
                                    extra_body={"return_token_ids": True, "ignore_eos": True,
                                                "return_tokens_as_token_ids": True})
    c = out.choices[0]
    assert len(c.token_ids) == 4 and out.usage.prompt_tokens == len(c.prompt_token_ids)
    assert c.logprobs.tokens == [f"token_id:{t}" for t in c.token_ids]
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                              stream=True, extra_body={"return_token_ids": True,
                                                                       "ignore_eos": True}))
    assert streamed[0].choices[0].prompt_token_ids == c.prompt_token_ids
    assert streamed[0].choices[0].text  # the ids ride on the first content chunk
    assert len(sum((ch.choices[0].token_ids for ch in streamed), [])) == 4
    plain = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1}).json()
    assert plain["choices"][0]["token_ids"] is None  # vLLM sends the field, null
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
        "stream": True, "return_token_ids": True, "ignore_eos": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert "prompt_token_ids" in events[0]
    assert all("prompt_token_ids" not in e for e in events[1:])
    assert len(sum((e["choices"][0].get("token_ids", []) for e in events), [])) == 3


def test_chosen_ids_allowed_ids_and_the_whole_vocabulary(server, client):
    """vLLM's test_logprob_token_ids with values: the chosen ids' logprobs are the ones the
    whole vocabulary (logprobs -1) gives the same position."""
    ask = dict(model=MODEL, prompt="Hello", max_tokens=1, temperature=0.0)
    out = client.completions.create(**ask, logprobs=5, extra_body={
        "logprob_token_ids": [5000, 7], "allowed_token_ids": [42],
        "return_tokens_as_token_ids": True})
    lp = out.choices[0].logprobs
    assert lp.tokens == ["token_id:42"]
    assert set(lp.top_logprobs[0]) == {"token_id:42", "token_id:5000", "token_id:7"}
    whole = client.completions.create(**ask, logprobs=-1, extra_body={
        "allowed_token_ids": [42], "return_tokens_as_token_ids": True})
    every = whole.choices[0].logprobs.top_logprobs[0]
    assert len(every) == 49152
    for key, value in lp.top_logprobs[0].items():
        assert value == pytest.approx(every[key], abs=1e-5)
    assert lp.token_logprobs[0] == pytest.approx(every["token_id:42"], abs=1e-5)
    # chat: every chosen entry is listed (the sampled one too), and -1 lists the vocabulary
    msgs = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, logprobs=True,
                                          top_logprobs=3, extra_body={
                                              "logprob_token_ids": [300, 301], "ignore_eos": True})
    for item in chat.choices[0].logprobs.content:
        listed = [t.token for t in item.top_logprobs]
        assert {"om", "il", item.token} == set(listed) and len(listed) == len(set(listed))
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1, logprobs=True,
                                          top_logprobs=-1)
    top = chat.choices[0].logprobs.content[0].top_logprobs
    assert len(top) == 49152 and top[0].logprob == max(t.logprob for t in top)


def test_bad_words_over_http(server, client):
    """vLLM's bad_words on completions and chat: the words the free answer holds are gone
    from the banned one, which is otherwise the same up to the first of them."""
    ask = dict(model=MODEL, max_tokens=16, temperature=0.0)
    ids = {"return_token_ids": True, "ignore_eos": True}
    free = client.completions.create(**ask, prompt=PROMPT, extra_body=ids).choices[0]
    tok = _smollm2_tokenizer()
    word = tok.decode(free.token_ids[3:5])  # two tokens of the free answer, as text
    banned = client.completions.create(**ask, prompt=PROMPT,
                                       extra_body={**ids, "bad_words": word}).choices[0]
    assert banned.token_ids[:4] == free.token_ids[:4] and banned.token_ids[4] != free.token_ids[4]
    msgs = [{"role": "user", "content": "Hi"}]
    free = client.chat.completions.create(**ask, messages=msgs, extra_body=ids).choices[0]
    word = tok.decode(free.token_ids[:2])
    banned = client.chat.completions.create(**ask, messages=msgs,
                                            extra_body={**ids, "bad_words": [word]}).choices[0]
    out = banned.token_ids
    assert out != free.token_ids
    for w in bad_words_token_ids(tok, [word]):
        assert not any(out[i : i + len(w)] == w for i in range(len(out)))
    # a long list (tokenized off the event loop) with the same word among 127 others
    many = [f"{i} " + "zq" * 100 for i in range(127)] + [word]
    again = client.chat.completions.create(**ask, messages=msgs,
                                           extra_body={**ids, "bad_words": many}).choices[0]
    assert again.token_ids == banned.token_ids


SAYING = "An apple a day, keeps"


def test_chat_continue_final_message_and_echo(server):
    messages = [{"role": "user", "content": "tell me a saying"},
                {"role": "assistant", "content": SAYING}]
    body = {"messages": messages, "max_tokens": 3, "return_token_ids": True,
            "continue_final_message": True, "add_generation_prompt": False}
    for echo in (True, False):
        r = post(server, "/v1/chat/completions", {**body, "echo": echo}).json()
        message = r["choices"][0]["message"]
        assert message["role"] == "assistant"
        assert message["content"].startswith(SAYING) == echo
    # The prompt ends inside the assistant turn: no <|im_end|> after the saying.
    ids = r["prompt_token_ids"]
    tok = httpx.post(server.url + "/detokenize", json={"model": MODEL, "tokens": ids}).json()
    assert tok["prompt"].endswith(SAYING)
    closed = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1,
                                                   "return_token_ids": True,
                                                   "add_generation_prompt": False}).json()
    assert len(closed["prompt_token_ids"]) > len(ids)  # the turn closed after the saying
    r = post(server, "/v1/chat/completions", {**body, "add_generation_prompt": True})
    assert r.status_code == 400 and "Cannot set both" in r.json()["error"]["message"]
    streamed = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, **body, "echo": True, "stream": True})
    events = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert content.startswith(SAYING)


def test_chat_template_options():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]
    body = {"chat_template_kwargs": {"enable_thinking": False}, "documents": [{"text": "d"}],
            "add_generation_prompt": False, "continue_final_message": True, "echo": True}
    options = chat_options(messages, body)
    assert options.template_options == {
        "enable_thinking": False, "documents": [{"text": "d"}], "add_generation_prompt": False,
        "continue_final_message": True}
    assert options.role == "assistant" and options.echo == "Hello"
    with pytest.raises(APIError, match="chat_template_kwargs"):
        chat_options(messages, {"chat_template_kwargs": {"messages": []}})
    with pytest.raises(APIError, match="Cannot set both"):
        chat_options(messages, {"continue_final_message": True})
    # chat_template_kwargs' add_generation_prompt wins over the field (vLLM's order), is checked
    # as the field is, and the answer's role and the conflict check follow it
    kwargs = {"chat_template_kwargs": {"add_generation_prompt": False}}
    options = chat_options(messages, {**kwargs, "echo": True})
    assert options.template_options["add_generation_prompt"] is False
    assert (options.role, options.echo) == ("assistant", "Hello")  # the last message's role
    assert chat_options(messages[:1], kwargs).role == "user"
    with pytest.raises(APIError, match="Cannot set both"):
        chat_options(messages, {"chat_template_kwargs": {"add_generation_prompt": True},
                                "add_generation_prompt": False, "continue_final_message": True})
    with pytest.raises(APIError, match=r"chat_template_kwargs\.add_generation_prompt' must be "
                                       r"a boolean, got str"):
        chat_options(messages, {"chat_template_kwargs": {"add_generation_prompt": "yes"}})


def test_continue_final_message_cuts_the_rendered_chat():
    from engine.model.chat_template import compile_template, cut_at_mark, final_text, mark_final

    def continued(source, messages):
        marked = mark_final(messages, "\ue002m\ue003")
        return cut_at_mark(compile_template(source).render(messages=marked), "\ue002m\ue003",
                           final_text(messages))

    plain = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
    trims = "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</s>{% endfor %}"
    messages = [{"role": "user", "content": "Complete: Sure: 42"},
                {"role": "assistant", "content": "Sure: "}]
    # the final message's own end, not an earlier message holding the same text
    assert continued(plain, messages) == "<user>Complete: Sure: 42</s><assistant>Sure: "
    # a template that trims the message: its trailing space goes too, as HF cuts it
    assert continued(trims, messages) == "<user>Complete: Sure: 42</s><assistant>Sure:"
    empty = [messages[0], {"role": "assistant", "content": ""}]
    assert continued(plain, empty) == "<user>Complete: Sure: 42</s><assistant>"
    parts = [messages[0], {"role": "assistant", "content": [{"type": "text", "text": "A"},
                                                            {"type": "text", "text": "B "}]}]
    assert continued("{% for m in messages %}[{% if m.content is string %}{{ m.content }}"
                     "{% else %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %}]"
                     "{% endfor %}", parts) == "[Complete: Sure: 42][AB "
    with pytest.raises(ValueError, match="does not appear"):
        continued("{% for m in messages %}{{ m.role }}{% endfor %}", messages)


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "hi", "seed": 2**63}, "seed", ["int64"]),
    ({"prompt": "hi", "seed": -(2**63) - 1}, "seed", ["int64"]),
    ({"prompt": "hi", "logit_bias": {"abc": 1, "5": 2}}, "logit_bias", ["'abc'"]),
    ({"prompt": "hi", "logit_bias": {"49153": 1}}, "logit_bias",
     ["49153", "49152", "out of vocabulary"]),
    ({"prompt": [49152]}, "prompt", ["out of vocabulary"]),
    ({"prompt": "hi", "seed": 2**63}, "seed", ["less_than_equal"]),
    ({"prompt_embeds": "abc"}, "prompt", ["Either prompt or prompt_embeds"]),
    ({"prompt": "hi", "prompt_embeds": "abc"}, "prompt_embeds", ["not supported"]),
    ({"prompt": "hi", "prompt_logprob_token_ids": [5]}, "prompt_logprob_token_ids",
     ["not supported"]),
    ({"prompt": "hi", "bad_words": 5}, "bad_words", ["string or an array of strings"]),
    ({"prompt": "hi", "bad_words": ["x", " "]}, "bad_words", ["empty or only whitespace"]),
    ({"prompt": "hi", "bad_words": ["x"] * 129}, "bad_words", ["at most 128"]),
    ({"prompt": "hi", "allowed_token_ids": [5, 49152]}, "allowed_token_ids",
     ["49152", "out of vocabulary"]),
    ({"prompt": "hi", "logprob_token_ids": [5]}, "logprob_token_ids", ["'logprobs'"]),
    ({"prompt": "hi", "logprob_token_ids": [5], "logprobs": 1, "echo": True, "max_tokens": 0},
     "logprob_token_ids", ["echo"]),
    ({"prompt": "hi", "stop_token_ids": [60000]}, "stop_token_ids", ["out of vocabulary"]),
    # JSON integers have no bound: past int64 (the engine's wire) or a float, each is a 400
    # naming its field, not a 500 from the encoder or math.isfinite
    ({"prompt": "hi", "stop_token_ids": [10**20]}, "stop_token_ids", ["token ids"]),
    ({"prompt": "hi", "allowed_token_ids": [10**20]}, "allowed_token_ids", ["token ids"]),
    ({"prompt": [5, 10**20]}, "prompt", ["token id"]),
    ({"prompt": "hi", "logit_bias": {str(10**20): 1}}, "logit_bias", ["token ids"]),
    ({"prompt": "hi", "logit_bias": {"1" * 5000: 1}}, "logit_bias", ["token ids", "1111..."]),
    ({"prompt": "hi", "logit_bias": {"5": 10**400}}, "logit_bias", ["finite numbers", "['5']"]),
    ({"prompt": "hi", "min_tokens": 10**20}, "min_tokens", ["int64", "less_than_equal"]),
    ({"prompt": "hi", "max_tokens": -(10**20)}, "max_tokens", ["int64", "greater_than_equal"]),
    ({"prompt": "hi", "presence_penalty": 10**400}, "presence_penalty", ["finite"]),
    ({"prompt": "hi", "top_p": 10**400}, "top_p", ["finite"]),
])
def test_validation_words(server, body, param, words):
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    for w in words:
        assert w in error["message"]
    ok = post(server, "/v1/completions", {"prompt": "hi", "seed": 2**63 - 1, "max_tokens": 1})
    assert ok.status_code == 200


def test_a_huge_integer_temperature_is_a_number_like_any_other(server):
    """No upper bound on temperature (vLLM's rule); 10**20 sent as a JSON integer is a float
    like 1e20, not an integer the engine's wire cannot carry (a 500 before)."""
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for path, extra in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", chat)):
        r = post(server, path, {**extra, "temperature": 10**20, "max_tokens": 2, "seed": 1})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2


def test_vllm_fields_sent_null_and_token_prompts_echoed_whole(server, client):
    plain = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}).json()
    assert plain["choices"][0]["prompt_token_ids"] is None
    assert plain["choices"][0]["token_ids"] is None
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": 1}).json()
    assert chat["prompt_token_ids"] is None and chat["choices"][0]["token_ids"] is None
    # A prompt of ids is echoed as the tokenizer spells them, special tokens included (vLLM).
    out = client.completions.create(model=MODEL, prompt=[0, 0, 0], max_tokens=2, echo=True,
                                    logprobs=0)
    assert out.choices[0].text.startswith("<|endoftext|>" * 3)
    assert out.choices[0].logprobs.tokens[:3] == ["<|endoftext|>"] * 3


def test_chat_stream_last_chunk_carries_text_and_finish_reason(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, stream=True,
        extra_body={"ignore_eos": True}))
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0] is chunks[-1]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices[0].delta.content  # vLLM's shape: no empty closing chunk


def test_tokens_as_ids_server_default():
    from server.app import ServerSettings
    from server.extras import read_extras

    settings = ServerSettings("m", return_tokens_as_token_ids=True)
    assert read_extras({}, chat=False, settings=settings).tokens_as_ids
    body = {"return_tokens_as_token_ids": False}
    assert not read_extras(body, chat=True, settings=settings).tokens_as_ids
    assert not read_extras({}, chat=False, settings=ServerSettings("m")).tokens_as_ids


def test_force_include_usage_and_add_special_tokens_fields():
    from server.app import ServerSettings
    from server.extras import read_extras
    from server.openai_routes import _stream_flags

    forced = ServerSettings("m", force_include_usage=True)  # --enable-force-include-usage
    assert _stream_flags({"stream": True}, forced) == (True, True)
    assert read_extras({"stream": True}, chat=True, settings=forced).continuous_usage
    plain = ServerSettings("m")
    assert _stream_flags({"stream": True}, plain) == (True, False)
    assert not read_extras({"stream": True}, chat=True, settings=plain).continuous_usage
    # vLLM's add_special_tokens: true for a completions prompt, false for chat (its template
    # writes them); asking for them in a chat is refused, not ignored
    assert read_extras({}, chat=False, settings=plain).add_special_tokens
    assert not read_extras({"add_special_tokens": False}, chat=False,
                           settings=plain).add_special_tokens
    assert not read_extras({}, chat=True, settings=plain).add_special_tokens
    with pytest.raises(APIError) as e:
        read_extras({"add_special_tokens": True}, chat=True, settings=plain)
    assert e.value.param == "add_special_tokens"


def test_tokenize_messages_refuses_add_special_tokens_as_chat_does(server):
    """/tokenize's messages form read no add_special_tokens: true (or a string) was a 200 with
    the template's tokens alone, where the chat call it counts for is a 400 naming the field."""
    chat = [{"role": "user", "content": "Hi"}]
    for value in (True, "yes"):
        for path in ("/tokenize", "/v1/chat/completions"):
            r = post(server, path, {"messages": chat, "add_special_tokens": value,
                                    "max_tokens": 1})
            assert r.status_code == 400, (path, value, r.text)
            assert r.json()["error"]["param"] == "add_special_tokens"
    plain = post(server, "/tokenize", {"messages": chat}).json()
    off = post(server, "/tokenize", {"messages": chat, "add_special_tokens": False}).json()
    assert off["tokens"] == plain["tokens"] and plain["count"] > 0


def test_chat_batch_answers_each_conversation_as_alone(server):
    """vLLM's POST /v1/chat/completions/batch: choice i is conversation i's answer, the same as
    that conversation sent alone; fields that answer in pieces are refused by name."""
    chats = [[{"role": "user", "content": "Hi"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]]
    common = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
    batch = post(server, "/v1/chat/completions/batch", {"messages": chats, **common})
    assert batch.status_code == 200, batch.text
    body = batch.json()
    assert body["object"] == "chat.completion" and [c["index"] for c in body["choices"]] == [0, 1]
    assert "metrics" not in body  # per-request timings only with --enable-per-request-metrics
    prompt_tokens = 0
    for chat, choice in zip(chats, body["choices"], strict=True):
        alone = post(server, "/v1/chat/completions", {"messages": chat, **common}).json()
        assert choice["message"] == alone["choices"][0]["message"]
        prompt_tokens += alone["usage"]["prompt_tokens"]
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["completion_tokens"] == 8
    for extra, param in (({"stream": True}, "stream"), ({"n": 2}, "n"),
                         # asked of a stream, which the batch never is (it was ignored, a 200)
                         ({"stream_options": {"include_usage": True}}, "stream_options"),
                         ({"stream_options": {"continuous_usage_stats": True}},
                          "stream_options"),
                         ({"messages": chats[0]}, "messages"),
                         ({"messages": [chats[0], [{"role": "nobody"}]]}, "messages[1][0]")):
        bad = post(server, "/v1/chat/completions/batch", {"messages": chats, **common, **extra})
        assert bad.status_code == 400, extra
        assert bad.json()["error"]["param"].startswith(param), bad.json()
        if param == "messages[1][0]":  # the message names the same conversation
            assert "messages[1][0]" in bad.json()["error"]["message"], bad.json()


def test_invocations_dispatch_by_body(server):
    chat = post(server, "/invocations", {"messages": [{"role": "user", "content": "Hi"}],
                                         "max_tokens": 2})
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion"
    completion = post(server, "/invocations", {"prompt": "Hi", "max_tokens": 2})
    assert completion.status_code == 200 and completion.json()["object"] == "text_completion"
    bad = post(server, "/invocations", {"input": "Hi"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "body"


def test_load_counts_calls_in_flight(server):
    load = lambda: httpx.get(server.url + "/load").json()["server_load"]  # noqa: E731
    assert load() == 0
    for stream in (False, True):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(post, server, "/v1/completions", {
                "prompt": "Hi", "max_tokens": 250, "ignore_eos": True, "stream": stream})
            seen = set()
            while not call.done():
                seen.add(load())
            assert call.result().status_code == 200
        assert 1 in seen and seen <= {0, 1}
        assert load() == 0
    server.wait_idle()


def test_beam_search_over_http(server, client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, n=2, max_tokens=5,
                                    temperature=0, extra_body={"use_beam_search": True,
                                                               "ignore_eos": True})
    texts = [c.text for c in out.choices]
    assert len(set(texts)) == 2 and out.usage.completion_tokens == 10
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, n=2, max_tokens=5,
                                              temperature=0, stream=True, extra_body={
                                                  "use_beam_search": True, "ignore_eos": True}))
    got = ["".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i)
           for i in range(2)]
    assert got == texts
    r = post(server, "/v1/completions", {"prompt": PROMPT, "n": 2, "best_of": 1,
                                         "use_beam_search": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
    server.wait_idle()


def test_streamed_chat_with_tools_carries_the_token_ids(server):
    """return_token_ids: a chat streamed under tools carries every token's id, as one without
    tools does (and vLLM's, whatever its tool parser holds back): they were left out."""
    tools = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "tools": tools}
    whole = post(server, "/v1/chat/completions", body).json()["choices"][0]["token_ids"]
    r = post(server, "/v1/chat/completions", {**body, "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    streamed = sum((c.get("token_ids") or [] for e in events for c in e["choices"]), [])
    assert len(whole) == 6 and streamed == whole


def test_streamed_chat_with_tools_ends_as_the_whole_answer(server):
    """Under tools a stream's last chunk carries the whole answer's finish_reason and
    stop_reason (here the stop id that ended it)."""
    tools = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "tools": tools}
    ids = post(server, "/v1/chat/completions", body).json()["choices"][0]["token_ids"]
    body["stop_token_ids"] = [ids[2]]
    whole = post(server, "/v1/chat/completions", body).json()["choices"][0]
    assert (whole["finish_reason"], whole["stop_reason"]) == ("stop", ids[2])
    r = post(server, "/v1/chat/completions", {**body, "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    last = [c for e in events for c in e["choices"]][-1]
    assert (last["finish_reason"], last["stop_reason"]) == ("stop", ids[2])


@pytest.mark.parametrize("path, extra", [
    ("/v1/completions", {"prompt": PROMPT}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
])
def test_prompt_logprobs_with_stream_is_refused(server, path, extra):
    """vLLM's rule: prompt_logprobs are not streamed, so asking for them with stream is a 400
    (they were computed and silently dropped); 0 passes, as in vLLM, and echo's own scores
    still stream."""
    r = post(server, path, {**extra, "max_tokens": 2, "stream": True, "prompt_logprobs": 1})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt_logprobs"
    assert "stream" in r.json()["error"]["message"]
    ok = post(server, path, {**extra, "max_tokens": 2, "stream": True, "prompt_logprobs": 0})
    assert ok.status_code == 200
    if "prompt" in extra:
        ok = post(server, path, {**extra, "max_tokens": 2, "stream": True, "echo": True,
                                 "logprobs": 1})
        assert ok.status_code == 200 and '"token_logprobs"' in ok.text


def test_spaces_between_special_tokens_is_read_not_ignored(server):
    """vLLM's spaces_between_special_tokens was an unknown field, dropped whatever its value.
    True (vLLM's default) is the tokenizer's own decoding, as vLLM's fast detokenizer writes it,
    and so is False while special tokens are skipped; False with them kept is refused by name."""
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    for extra, status in (({"spaces_between_special_tokens": True}, 200),
                          ({"spaces_between_special_tokens": False}, 200),
                          ({"spaces_between_special_tokens": False,
                            "skip_special_tokens": False}, 400),
                          ({"spaces_between_special_tokens": "no"}, 400)):
        r = post(server, "/v1/completions", {**body, **extra})
        assert r.status_code == status, (extra, r.text)
        if status == 400:
            assert r.json()["error"]["param"] == "spaces_between_special_tokens", r.text
    with pytest.raises(ValueError, match="spaces_between_special_tokens"):
        SamplingParams(spaces_between_special_tokens=False, skip_special_tokens=False)
