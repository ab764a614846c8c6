"""Forced tool calls read as the output comes: tool_choice "required" (a JSON array of
{"name", "arguments"} objects, server/tool_calls.tool_grammar) or a named tool (the output is its
arguments), turned into OpenAI's incremental delta.tool_calls entries.

    reader = ForcedCalls(choice, names, parallel)
    entries = reader.feed(text)      # for each new piece of output (often none)
    calls, whole = reader.finish()   # the calls as a whole answer reports them

A call's first entry carries its index, id, type and name (sent once the name is complete) and
the arguments so far; the next ones only {"index", "function": {"arguments": more}}. Arguments
are the model's own text of the value (the grammar writes compact JSON: ", " and ": "), never
re-encoded, so a call's entries join to exactly the `arguments` of the whole answer, which reads
the text through this same reader.

NOTE: what went out stands. An output cut short (max_tokens, a stop string) is the calls begun,
the last one's arguments as far as they came, and its finish_reason stays the engine's
("length"); only calls whose text ended as the grammar ends them are `whole` (finish_reason
"tool_calls" under "required"). An output in which no call began (no name complete; a named
tool's output still blank) is content, whole and streamed alike.
"""

from __future__ import annotations

import itertools
import json
import uuid

_SPACE = " \t\r\n"  # JSON's whitespace
_SCALAR_ENDS = _SPACE + ",}]"  # what ends a bare number, true, false or null


def new_call(name: str, arguments) -> dict:
    """A tool call as message.tool_calls holds it: `arguments` as JSON text (an object given is
    dumped)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": text}}


class ForcedCalls:
    """One choice's forced calls, read a character at a time (the grammar fixes the layout, so
    no look-back is needed): `feed` returns the delta.tool_calls entries each new text makes."""

    def __init__(self, choice: str, names, parallel: bool = True):
        self.named = choice != "required"
        self.choice, self.names, self.parallel = choice, names, parallel
        self.calls: list[dict] = []  # the calls begun (new_call's form; arguments: below)
        self.arguments: list[list[str]] = []  # each call's arguments text, in pieces
        self.whole = False  # "required": the array ended as the grammar ends it
        self._held: list[str] = []  # arguments before their call's name (named: blank text)
        self._out: list[dict] = []  # the entries of the text being fed
        self._run: list[str] = []  # arguments characters of call _run_index, not in _out yet
        self._run_index = -1
        self._reader = None
        if not self.named:
            self._reader = self._array()
            next(self._reader)  # to its first `yield`, which takes the first character

    def feed(self, text: str) -> list[dict]:
        """The delta.tool_calls entries for this new output text (none for no text: a step
        whose text is held back, a stop string or a character's bytes still to come)."""
        self._out = []
        if not text:
            return self._out
        if self.named:
            if self.calls:
                self._arguments(0, text)
            else:  # blank text opens no call: it may yet be all the output
                self._held.append(text)
                if text.strip():
                    self._open(0, self.choice)
        elif self._reader is not None:
            for ch in text:
                try:
                    self._reader.send(ch)
                except StopIteration:  # the array ended, or the text is none the grammar makes
                    self._reader = None
                    break
        self._flush()
        return self._out

    def finish(self) -> tuple[list[dict], bool]:
        """(the calls begun, each with all its arguments text; whether they are whole)."""
        calls = [{**call, "function": {**call["function"], "arguments": "".join(pieces)}}
                 for call, pieces in zip(self.calls, self.arguments, strict=True)]
        if self.named:  # whole: its text is JSON (its finish_reason is the engine's anyway)
            return calls, bool(calls) and _parses(calls[0]["function"]["arguments"])
        return calls, bool(calls) and self.whole

    # ---------------------------------------------------------------- what goes out

    def _open(self, index: int, name: str) -> None:
        """Call `index`'s first entry, with the arguments held until its name came."""
        self._flush()
        call, held = new_call(name, ""), "".join(self._held)
        self._held = []
        self.calls.append(call)
        self.arguments.append([held])
        self._out.append({"index": index, **call, "function": {"name": name, "arguments": held}})

    def _arguments(self, index: int, text: str) -> None:
        """More arguments text of call `index`, held while its name is still to come."""
        if index == len(self.calls):
            self._held.append(text)
            return
        if index != self._run_index:
            self._flush()
            self._run_index = index
        self._run.append(text)

    def _flush(self) -> None:
        """The run of arguments characters as one entry (joined to its call's first entry when
        that went out in the same feed)."""
        if not self._run:
            return
        text, index = "".join(self._run), self._run_index
        self._run = []
        self.arguments[index].append(text)
        last = self._out[-1] if self._out else None
        if last is not None and last["index"] == index:
            last["function"]["arguments"] += text
        else:
            self._out.append({"index": index, "function": {"arguments": text}})

    # ---------------------------------------------------------------- the reader: generators
    # sent one character at a time; each takes the current character and returns the next

    def _array(self):
        """The whole output: "[", call objects separated by ",", "]", whitespace."""
        c = yield from _token((yield))
        if c != "[":
            return
        c = yield from _token((yield))
        for index in itertools.count():
            if c != "{" or not (yield from self._call(index)):
                return
            c = yield from _token((yield))
            if c == "]":
                break
            if c != ",":
                return
            if not self.parallel:
                # NOTE: parallel_tool_calls false lets the grammar write one call; should more
                # come, the first is taken, as under "auto", and the rest never goes out.
                self.whole = True
                return
            c = yield from _token((yield))
        self.whole = True
        while (yield) in _SPACE:
            pass
        self.whole = False  # text after the array: none the grammar makes

    def _call(self, index: int):
        """A call object from after its "{" through its "}": whether it was one. The grammar
        writes "name" first; "arguments" before it are held until the name is known."""
        name, has_arguments = None, False
        c = yield from _token((yield))
        while c == '"':
            key = yield from _string()
            c = yield from _token((yield))
            if c != ":":
                return False
            c = yield from _token((yield))
            if key == "name" and name is None and c == '"':
                name = yield from _string()
                if name not in self.names:
                    return False
                self._open(index, name)
                c = yield from _token((yield))
            elif key in ("arguments", "parameters") and not has_arguments and c not in ",:]}":
                has_arguments = True
                c = yield from _token((yield from self._value(c, index)))
            else:
                return False
            if c == "}" and name is not None:
                if not has_arguments:  # none written: no arguments, as "auto" reads such a call
                    self._arguments(index, "{}")
                return True
            if c != ",":
                return False
            c = yield from _token((yield))
        return False

    def _value(self, c: str, index: int):
        """One JSON value from its first character `c`, each of its characters passed on as
        call `index`'s arguments. Brackets are counted, not recursed into: any depth reads."""
        depth, in_string, escaped = 0, False, False
        while True:
            if depth == 0 and not in_string and c in _SCALAR_ENDS:
                return c  # a bare scalar ended
            if in_string:
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
            self._arguments(index, c)
            if depth == 0 and not in_string and c in '"}]':
                return (yield)
            c = yield


def _token(c: str):
    """`c`, or the first character after it that is not whitespace."""
    while c in _SPACE:
        c = yield
    return c


def _string():
    """A JSON string's value, read after its opening quote through its closing one (None where
    its escapes are not JSON's)."""
    chars, escaped = ['"'], False
    while True:
        c = yield
        chars.append(c)
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            try:
                return json.loads("".join(chars))
            except ValueError:
                return None


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):  # also: nested past the decoder's depth
        return False
    return True
