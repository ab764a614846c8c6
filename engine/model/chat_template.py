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
import jinja2.sandbox


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's tojson keeps non-ASCII text as is (jinja's built-in escapes it and HTML characters).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


# A render that runs longer is stopped (a template that loops, written into a model's files,
# would otherwise hold a server's thread, or its event loop, for good).
RENDER_SECONDS = 5.0
_render = threading.local()  # .deadline: when this thread's render must end (monotonic)


class _TimedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The sandbox, checking the render's deadline at every call, attribute and item lookup: a
    loop that does anything passes through one (the sandbox caps each range at 100,000)."""

    def _check(self):
        deadline = getattr(_render, "deadline", None)
        if deadline is not None and time.monotonic() > deadline:
            raise jinja2.exceptions.TemplateError(
                f"the chat template ran past {RENDER_SECONDS:g} s and was stopped")

    def call(self, *args, **kwargs):
        self._check()
        return super().call(*args, **kwargs)

    def getattr(self, obj, attribute):
        self._check()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self._check()
        return super().getitem(obj, argument)


@contextlib.contextmanager
def render_deadline(seconds: float | None = None):
    """Renders on this thread inside the block stop after `seconds` (default RENDER_SECONDS)
    with a TemplateError."""
    _render.deadline = time.monotonic() + (RENDER_SECONDS if seconds is None else seconds)
    try:
        yield
    finally:
        _render.deadline = None


def compile_template(source: str) -> jinja2.Template:
    env = _TimedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_split(render: Callable[[list], str], messages: list[dict],
                 special: re.Pattern) -> list[tuple[str, bool]]:
    """`render(messages)` cut into (text, is_client_special) pieces: True for a special token
    that matched `special` inside the messages, False for the text around them.

    Each such token is swapped for a placeholder the client cannot guess (a fresh nonce) before
    rendering, so the template still sees every message, and found again in its output.
    """
    nonce = secrets.token_hex(8)
    found: list[str] = []

    def hide(match: re.Match) -> str:
        found.append(match.group())
        return f"\ue000{nonce}:{len(found) - 1}\ue001"

    text = render(_map_strings(messages, lambda s: special.sub(hide, s)))
    pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", text)
    return [(found[int(p)], True) if i % 2 else (p, False) for i, p in enumerate(pieces)]


def _map_strings(value, fn):
    """`value` (JSON-like: dicts, lists, strings) with `fn` applied to every string in it."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, fn) for v in value]
    return value


def cut_after_final(text: str, message: dict) -> str:
    """The rendered chat up to the end of the final message's content, so the model continues
    that message instead of starting a new turn (the template closed it)."""
    content = message.get("content") or ""
    for needle in (content, content.strip()):
        at = text.rfind(needle) if needle else -1
        if at >= 0:
            return text[: at + len(needle)]
    raise ValueError("continue_final_message is set but the final message does not appear in "
                     "the rendered chat")
