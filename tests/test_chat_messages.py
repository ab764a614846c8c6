"""server/protocol.parse_messages: chat messages as templates get them, faults named by element."""

import pytest

from server.protocol import APIError, parse_messages


def test_content_becomes_text_for_the_template():
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = parse_messages({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Weather"},
                                     {"type": "text", "text": "in Oslo?"}]},
        {"role": "assistant", "content": None, "tool_calls": [call]},  # as the openai SDK sends
        {"role": "assistant", "tool_calls": [call]},  # content left out
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'}]})
    # text parts joined by newlines, as vLLM joins them
    assert [m["content"] for m in messages] == ["Weather\nin Oslo?", "", "", '{"temp": 3}']
    assert messages[1]["tool_calls"] == [call]  # kept as it came


@pytest.mark.parametrize("message, param", [
    ({"role": "user", "content": None}, "messages[1].content"),
    ({"role": "tool", "tool_call_id": "c1"}, "messages[1].content"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, "messages[1].content"),
    ({"role": "assistant", "content": None, "tool_calls": "f"}, "messages[1].tool_calls"),
    ({"role": "assistant", "content": None, "tool_calls": [5]},
     "messages[1].tool_calls[0].function"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]},
     "messages[1].tool_calls[0].function"),
    ({"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": [1]}}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"content": "x"}, "messages[1]"),
])
def test_faults_name_the_element(message, param):
    with pytest.raises(APIError) as e:
        parse_messages({"messages": [{"role": "user", "content": "hi"}, message]})
    assert e.value.status == 400 and e.value.param == param


def test_chat_logprob_faults_speak_of_top_logprobs():
    """Chat's top_logprobs is SamplingParams' logprobs: its faults name the chat field."""
    from server.protocol import parse_sampling_params

    with pytest.raises(APIError) as e:
        parse_sampling_params({"logprobs": True, "top_logprobs": 30}, chat=True)
    assert e.value.param == "top_logprobs" and str(e.value.message).startswith("top_logprobs")
    with pytest.raises(APIError) as e:
        parse_sampling_params({"logprobs": 30}, chat=False)
    assert e.value.param == "logprobs" and str(e.value.message).startswith("logprobs")


def test_max_tokens_defaults_of_completions_and_chat():
    """Completions: OpenAI's 16 when the field is absent, the model's default for a null;
    chat: the model's default (none: up to the context) either way."""
    from server.protocol import parse_sampling_params

    defaults = {"max_tokens": 300}
    for body, want in (({}, 16), ({"max_tokens": None}, 300), ({"max_tokens": 5}, 5)):
        assert parse_sampling_params(body, chat=False, defaults=defaults).max_tokens == want
    assert parse_sampling_params({}, chat=False).max_tokens == 16
    assert parse_sampling_params({}, chat=True, defaults=defaults).max_tokens == 300
    assert parse_sampling_params({}, chat=True).max_tokens is None


def test_legacy_top_logprobs_put_the_chosen_token_first():
    """Completions' top_logprobs: the position's own token first (clients read the first key
    as the token, as vLLM orders them), then the rest by logprob; -inf shown as -9999."""
    from server.protocol import legacy_top_logprobs

    got = legacy_top_logprobs(5, {3: -0.1, 5: -2.0, 7: -0.5, 9: float("-inf")}, str)
    assert list(got.items()) == [("5", -2.0), ("3", -0.1), ("7", -0.5), ("9", -9999.0)]


def _render(source: str, messages: list[dict], **kwargs) -> str:
    """`messages`, as the chat routes hand them to the template (parse_messages, then
    template_messages), rendered by `source` on a vocabulary-less tokenizer."""
    import tokenizers

    from engine.model.chat_template import template_messages
    from engine.model.tokenizer import Tokenizer

    tok = Tokenizer(tokenizers.Tokenizer(tokenizers.models.BPE()), "<s>", "</s>", source)
    chat = template_messages(parse_messages({"messages": messages}))
    return tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=False, **kwargs)


def test_null_fields_are_left_out_as_hf_drops_them():
    """The openai SDK's message.model_dump() writes "name": None, "refusal": None, ...: HF's
    apply_chat_template drops a null field (vLLM passes only the ones it knows), so a template's
    `is defined` test sees none of them (it wrote "name=None")."""
    source = ("{% for m in messages %}[{{ m.role }}{% if m.name is defined %} name={{ m.name }}"
              "{% endif %}{% if m.refusal is defined %} refusal={{ m.refusal }}{% endif %}"
              "{% if m.tool_call_id is defined %} id={{ m.tool_call_id }}{% endif %}"
              " {{ m | length }}]{{ m.content }}{% endfor %}")
    messages = [
        {"role": "user", "content": "hi", "name": None},
        {"role": "assistant", "content": "4.", "refusal": None, "annotations": None,
         "audio": None, "function_call": None, "tool_calls": None},
        {"role": "tool", "content": "21", "tool_call_id": None, "name": None},
        {"role": "user", "content": "ok", "name": "bob"}]
    assert _render(source, messages) == "[user 2]hi[assistant 2]4.[tool 2]21[user name=bob 3]ok"


def test_reasoning_reaches_the_template_under_each_name():
    """As HF's apply_chat_template: a message's reasoning (reasoning_content, thinking or
    reasoning, the first one it has) is also `thinking` (gpt-oss's template reads it; it was
    left out) and `reasoning_content` (Qwen3's); `reasoning` (vLLM's name) is kept too."""
    source = ("{% for m in messages %}{{ m | tojson }}|{{ m.thinking }}|{{ m.reasoning_content }}"
              "|{{ m.reasoning }}\n{% endfor %}")
    messages = [{"role": "assistant", "content": "4.", "reasoning": "add"},
                {"role": "assistant", "content": "5.", "reasoning_content": "R", "thinking": "T"},
                {"role": "assistant", "content": "6.", "thinking": "T"},
                {"role": "assistant", "content": "7.", "reasoning": None}]
    assert _render(source, messages) == (
        '{"thinking": "add", "role": "assistant", "content": "4.", "reasoning": "add", '
        '"reasoning_content": "add"}|add|add|add\n'
        '{"thinking": "T", "role": "assistant", "content": "5.", "reasoning_content": "R", '
        '"reasoning": "R"}|T|R|R\n'
        '{"thinking": "T", "role": "assistant", "content": "6.", "reasoning_content": "T", '
        '"reasoning": "T"}|T|T|T\n'
        '{"role": "assistant", "content": "7."}|||\n')


def test_a_folders_named_special_tokens_are_template_variables(tmp_path):
    """HF hands a template every named special token of tokenizer_config.json (its
    special_tokens_map): sep_token, cls_token and mask_token were left undefined."""
    import json

    import tokenizers

    from engine.model.tokenizer import Tokenizer

    tokenizers.Tokenizer(tokenizers.models.BPE()).save(str(tmp_path / "tokenizer.json"))
    names = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        **{f"{n}_token": f"<{n}>" for n in names},
        "chat_template": "|".join(f"{{{{ {n}_token }}}}" for n in names)}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.apply_chat_template([], tokenize=False) == (
        "<bos>|<eos>|<unk>|<sep>|<pad>|<cls>|<mask>")


@pytest.mark.parametrize("source", [
    "{% set ns = namespace(_seen=1) %}{{ ns._seen }}",
    "{% set ns = namespace() %}{% set ns._seen = 1 %}{{ ns._seen }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}{{ ns }}"])
def test_a_namespace_takes_no_underscore_attributes(source):
    """As HF's: `ns._seen` was undefined (the sandbox reads no underscore attribute), so the
    template rendered without it; HF refuses it, and so does the server (a 400 naming it)."""
    import jinja2

    with pytest.raises(jinja2.exceptions.SecurityError, match="underscore-prefixed"):
        _render(source, [{"role": "user", "content": "hi"}])
    assert _render("{% set ns = namespace(seen=1) %}{% set ns.more = ns.seen + 1 %}"
                   "{{ ns.seen }}{{ ns.more }}", [{"role": "user", "content": "hi"}]) == "12"


def test_a_call_may_pass_a_keyword_named_self():
    """The sandbox's call took `self` as its own: namespace(self=...), which HF renders, failed
    with "got multiple values for argument 'self'"."""
    assert _render("{% set ns = namespace(self='s', context='c', obj='o') %}"
                   "{{ ns.self }}{{ ns.context }}{{ ns.obj }}",
                   [{"role": "user", "content": "hi"}]) == "sco"


def test_range_is_a_range_to_the_template():
    """range() checks the render's deadline as a loop walks it; to the template it is still
    HF's range: it printed as an object's repr, equalled no range, and had no start, stop,
    step, index() nor count() (an UndefinedError, a 400)."""
    assert _render("{{ range(3) }}|{{ range(1, 9, 3) | string }}|{{ range(3) == range(3) }}|"
                   "{{ range(2, 9, 3).start }}{{ range(2, 9, 3).stop }}{{ range(2, 9, 3).step }}|"
                   "{{ range(5).index(3) }}{{ range(5).count(7) }}|{{ range(3)._range }}|"
                   "{{ range(3) | reverse | list }}{% for i in range(2) %}{{ i }}{% endfor %}",
                   [{"role": "user", "content": "hi"}]) == (
        "range(0, 3)|range(1, 9, 3)|True|293|30||[2, 1, 0]01")
