"""Chat templates rendered the way HF transformers renders them (a jinja2 sandbox with HF's
helpers), and the split of a rendered conversation into what the template wrote and the special
tokens a client wrote inside its messages."""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's tojson keeps non-ASCII text as is (jinja's built-in escapes it and HTML characters).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


# A render that runs longer is stopped (a template that loops, written into a model's files,
# would otherwise hold a server's thread, or its event loop, for good).
RENDER_SECONDS = 5.0
# The longest string or list one `*` (or `**`) may make in a template: no chat needs more, and a
# loop over a larger one would pass no deadline check for a long time.
MAX_PRODUCT = 1 << 20
_render = threading.local()  # .deadline, .seconds: when this thread's render must end, its limit


class RenderTimeout(jinja2.exceptions.TemplateError):
    """A render ran past its deadline (render_deadline)."""


def _check_deadline():
    deadline = getattr(_render, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise RenderTimeout(f"the chat template ran past {_render.seconds:g} s and was stopped")


class _TimedRange:
    """range() for templates: the sandbox's capped range, checking the render's deadline as a
    loop walks it (a loop over a range does no call or lookup the sandbox would see)."""

    def __init__(self, *args):
        self._range = jinja2.sandbox.safe_range(*args)

    def __iter__(self):
        for n, value in enumerate(self._range):
            if n % 256 == 0:
                _check_deadline()
            yield value

    def __len__(self):
        return len(self._range)

    def __getitem__(self, index):
        return self._range[index]

    def __contains__(self, value):
        return value in self._range

    def __reversed__(self):
        return reversed(self._range)

    # the rest of a range, as HF's templates see it: {{ range(3) }} is "range(0, 3)", and
    # start, stop, step, index() and count() are there
    def __repr__(self):
        return repr(self._range)

    def __eq__(self, other):
        return self._range == (other._range if isinstance(other, _TimedRange) else other)

    def __hash__(self):
        return hash(self._range)

    def __getattr__(self, name):
        if name.startswith("_"):  # (_range itself, before __init__ set it)
            raise AttributeError(name)
        return getattr(self._range, name)


class _TimedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The sandbox, checking the render's deadline at every call, attribute and item lookup, in
    every range a loop walks (_TimedRange) and at every `*` (whose strings and lists are capped
    at MAX_PRODUCT items)."""

    intercepted_binops = frozenset({"*", "**"})

    def call(self, context, obj, /, *args, **kwargs):  # positional-only: namespace(self=1)
        _check_deadline()
        return super().call(context, obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        _check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _check_deadline()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator, left, right):
        _check_deadline()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if (isinstance(seq, (str, list, tuple)) and isinstance(times, int)
                        and len(seq) * times > MAX_PRODUCT):
                    raise jinja2.exceptions.TemplateError(
                        f"the chat template builds a string or list of {len(seq) * times:,} "
                        f"items (at most {MAX_PRODUCT:,})")
        return super().call_binop(context, operator, left, right)


@contextlib.contextmanager
def render_deadline(seconds: float | None = None):
    """Renders on this thread inside the block stop after `seconds` (default RENDER_SECONDS)
    with a RenderTimeout."""
    _render.seconds = RENDER_SECONDS if seconds is None else seconds
    _render.deadline = time.monotonic() + _render.seconds
    try:
        yield
    finally:
        _render.deadline = None


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %} ... {% endgeneration %}`: HF marks the assistant's own tokens with it
    (for training masks); rendering a prompt only needs the text inside."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


class _Namespace(jinja2.utils.Namespace):
    """namespace() refusing underscore-prefixed attributes, as HF's: the sandbox reads none
    (`ns._x` was undefined, so a template that stores one rendered without it), and HF's
    apply_chat_template refuses the template."""

    def __init__(*args, **kwargs):  # jinja's signature trick: namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, "
                f"got {name!r}")


def compile_template(source: str) -> jinja2.Template:
    env = _TimedSandbox(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["range"] = _TimedRange
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def render_split(render: Callable[[dict], str], client: dict,
                 special: re.Pattern) -> list[tuple[str, bool]]:
    """`render(client)` cut into (text, is_client_special) pieces: True for a special token that
    matched `special` inside what the client wrote (`client`: the template variables it gave,
    messages, tools, documents, chat_template_kwargs; keys too, which tojson writes), False for
    the text around them.

    Each such token is swapped for a placeholder the client cannot guess (a fresh nonce) before
    rendering, so the template still sees every value, and found again in its output. The
    placeholder is printable (a template's `| string` of a dict writes its repr, which escapes
    unprintable characters such as private-use ones), of digits (`| upper`, `| lower`) and free
    of HTML's characters (`| e`, Markup), so it comes out of the template as it went in.
    """
    nonce = f"{secrets.randbits(64):020d}"
    found: list[str] = []

    def hide(match: re.Match) -> str:
        found.append(match.group())
        return f"\u27e6{nonce}:{len(found) - 1}\u27e7"

    text = render(_map_strings(client, lambda s: special.sub(hide, s)))
    pieces = re.split(f"\u27e6{nonce}:(\\d+)\u27e7", text)
    return [(found[int(p)], True) if i % 2 else (p, False) for i, p in enumerate(pieces)]


def _map_strings(value, fn):
    """`value` (JSON-like: dicts, lists, strings) with `fn` applied to every string in it, the
    keys of its dicts included."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {fn(k) if isinstance(k, str) else k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, fn) for v in value]
    return value


def final_text(messages: list[dict]) -> str:
    """The text continue_final_message continues: the final message's content, or the text of
    the last part that has one (as HF transformers takes it)."""
    if not messages or not isinstance(messages[-1], dict):
        raise ValueError("continue_final_message is set but there is no final message to continue")
    content = messages[-1].get("content")
    if isinstance(content, (list, tuple)):
        parts = [p for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        content = parts[-1]["text"] if parts else None
    if not isinstance(content, str):
        raise ValueError("continue_final_message is set but the final message has no text to "
                         "continue")
    return content


def mark_final(messages: list[dict], mark: str) -> list[dict]:
    """`messages` with `mark` + " " after final_text, for cut_at_mark to find in the rendered
    chat."""
    final_text(messages)  # there is one
    final = dict(messages[-1])
    content = final["content"]
    if isinstance(content, str):
        final["content"] = content + mark + " "
    else:
        parts = list(content)
        i = max(i for i, p in enumerate(parts)
                if isinstance(p, dict) and isinstance(p.get("text"), str))
        parts[i] = {**parts[i], "text": parts[i]["text"] + mark + " "}
        final["content"] = parts
    return [*messages[:-1], final]


def cut_at_mark(text: str, mark: str, final: str) -> str:
    """The rendered chat up to the end of the final message (text `final`), which mark_final
    marked: the model goes on with that message instead of a new turn (the template closed it).

    A template that trims the message's end (Llama 3's `| trim`) trimmed the space after the
    mark; then the message's own trailing spaces go too, as the template cut them. As HF
    transformers, the chat must hold the message's text (stripped) verbatim: a template that
    leaves the message out or writes it changed (escaped by `tojson`, as Llama 3.1 writes a
    tool's result) is refused, not continued inside an escaped string. Where HF would cut
    elsewhere (it looks for the text's last occurrence anywhere in the chat), this cuts at the
    message itself: an empty message leaves its turn open, a dropped one is refused.
    """
    at = text.rfind(mark)
    cut = text[:at] if text.startswith(mark + " ", at) else text[:at].rstrip()
    if at < 0 or not cut.rstrip().endswith(final.strip()):
        raise ValueError("continue_final_message is set but the final message does not appear "
                         "in the chat after applying the chat template (the template leaves it "
                         "out or changes it, e.g. escapes it); the final message and the chat "
                         "template are not compatible")
    return cut


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates expect them (as vLLM hands them over): a field that is null
    left out (HF's apply_chat_template drops them, vLLM passes only the fields it knows: the
    openai SDK's message.model_dump() writes `"name": None`, `"refusal": None`, ..., which a
    template's `message.name is defined` would take for a name and write as "None"), an
    assistant's tool call arguments as a mapping (OpenAI sends them as JSON text; HF templates
    write them with `tojson`; empty or missing: {}), an empty list of tool calls, or a null one,
    left out (Llama 3.1's template takes `'tool_calls' in message` for a turn of calls and
    refuses both; vLLM drops a null one), and a message's reasoning under each name a template
    reads (_alias_reasoning)."""
    out = []
    for m in messages:
        if any(v is None for v in m.values()):
            m = {k: v for k, v in m.items() if v is not None}
        m = _alias_reasoning(m)
        if m.get("role") != "assistant":
            out.append(m)
            continue
        m = dict(m)
        calls = m.get("tool_calls")
        if isinstance(calls, list) and not calls:
            del m["tool_calls"]
        elif isinstance(calls, list):
            fixed = []
            for call in calls:
                fn = dict(call.get("function") or {}) if isinstance(call, dict) else {}
                arguments = fn.get("arguments")
                if not arguments:
                    fn["arguments"] = {}
                elif isinstance(arguments, str):
                    try:
                        fn["arguments"] = json.loads(arguments)
                    except (json.JSONDecodeError, RecursionError):
                        pass  # the template gets the text as it came (also: nested too deep)
                fixed.append({**call, "function": fn} if isinstance(call, dict) else call)
            m["tool_calls"] = fixed
        out.append(m)
    return out


# The names a message's reasoning comes under, the first one first (HF's _REASONING_FIELDS).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(m: dict) -> dict:
    """`m` with its reasoning (the first of _REASONING_FIELDS it has) also as
    `reasoning_content` (Qwen3's template reads it) and `thinking` (gpt-oss's), as HF's
    apply_chat_template fills them, and as `reasoning` (vLLM's name for it)."""
    reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
    if reasoning is None:
        return m
    # HF's key order (a template's `message | tojson` shows it): `thinking` first,
    # `reasoning_content` where it was, else last
    m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
    m.setdefault("reasoning", reasoning)
    return m
