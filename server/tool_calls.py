"""Tool calling on /v1/chat/completions: `tools`, `tool_choice`, `parallel_tool_calls`.

    tools, choice = parse_tools(body)            # checked; choice: "none" | "auto" | "required" |
                                                 # the name of the one function to call
    so = tool_grammar(tools, choice, parallel)   # "required" / a named tool: the output is forced
    calls = ToolCallParser(choice, names)        # output text -> (content, tool_calls)

How a model writes a call ("auto"): the Hermes / Qwen form `<tool_call>{"name": ..., "arguments":
{...}}</tool_call>` (one block per call; Qwen3-Coder's blocks hold `<function=NAME>` and a
`<parameter=KEY>` block per argument instead of JSON, read as the tool's schema types them),
Llama 3.x's bare JSON `{"name": ..., "parameters": {...}}` (several separated by ";"), or
Mistral's `[TOOL_CALLS]` and a JSON array of such objects
(the tag is a special token, so the text may hold the array alone). With "required" the grammar
makes the output a JSON array of {"name", "arguments"} objects; with a named tool it makes the
output that tool's arguments object. Those forced calls are read, whole and streamed alike, by
server/forced_calls.py, and stream as they are written.
"""

from __future__ import annotations

import json
import re

from engine.core.sampling_params import StructuredOutputsParams
from server.forced_calls import ForcedCalls, new_call
from server.protocol import bad_request, get_field

# The body is stripped after the match: `\s*(.*?)\s*` backtracks quadratically over a long run
# of whitespace followed by more text (24,000 characters: seconds, on the event loop).
_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
HERMES_OPEN = "<tool_call>"
LLAMA_PYTHON_TAG = "<|python_tag|>"  # Llama 3.1+ may open a call with it
MISTRAL_TAG = "[TOOL_CALLS]"  # Mistral's calls follow it, as one JSON array


def parse_tools(body: dict) -> tuple[list[dict] | None, str | None]:
    """(the request's tools, tool_choice as "none" | "auto" | "required" | a function name)."""
    tools = get_field(body, "tools", "list")
    choice = body.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice", "'tool_choice' needs 'tools'")
        return None, None
    names = {}  # a dict: insertion order, and linear time for 100,000 tools
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
                or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request("tools", f"tools[{i}] must be {{'type': 'function', 'function': "
                                       "{'name': ..., 'parameters': {...}}}")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad_request("tools", f"tools[{i}].function.parameters must be a JSON schema "
                                       "object")
        if fn["name"] in names:
            raise bad_request("tools", f"tools[{i}] repeats the function name {fn['name']!r}: "
                                       "a call names the function it calls")
        names[fn["name"]] = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise bad_request("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' "
                              "or {'type': 'function', 'function': {'name': ...}}")
        if name not in names:
            listed = ", ".join(list(names)[:10]) + (", ..." if len(names) > 10 else "")
            raise bad_request("tool_choice", f"'tool_choice' names {name[:64]!r}, which is not "
                                             f"among the tools ({listed})")
        return tools, name
    elif choice not in ("none", "auto", "required"):
        raise bad_request("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or "
                                         f"a function object, got {choice!r}")
    return tools, choice


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object"}


def tool_grammar(tools: list[dict], choice: str, parallel: bool
                 ) -> StructuredOutputsParams | None:
    """The constraint that enforces `choice` ("required" or a tool name); None for "auto"/"none"."""
    if choice in ("auto", "none"):
        return None
    if choice != "required":
        [tool] = [t for t in tools if t["function"]["name"] == choice]
        return StructuredOutputsParams(json=_parameters(tool))
    # Each tool's parameters become $defs/__tool_i of the array's schema, and every local
    # reference in them ("#", "#/$defs/...", "#/definitions/...", "#/properties/...") is moved
    # under that root, so it still points where it did in the tool's own schema.
    defs, calls = {}, []
    for i, t in enumerate(tools):
        root = f"#/$defs/__tool_{i}"
        params = _parameters(t)
        if not isinstance(params.get("$defs", {}), dict):
            raise bad_request("tools", f"tools[{i}].function.parameters.$defs must be an object")
        defs[f"__tool_{i}"] = _moved_refs(params, root)
        calls.append({"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                       "arguments": {"$ref": root}},
                      "required": ["name", "arguments"], "additionalProperties": False})
    schema = {"type": "array", "items": {"anyOf": calls}, "minItems": 1, "$defs": defs}
    if not parallel:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema)


def referring_parameters(tools: list[dict]) -> list[tuple[int, StructuredOutputsParams]]:
    """(index, parameters as a grammar of their own) of each tool whose parameters hold a
    reference: only a reference ({"$ref": "#"}) makes a schema that compiles allow no first
    token (llguidance refuses the others), and the grammar of "required" calls, which lets a
    call open ('[{"name": ...') before its arguments, does not show it."""
    return [(i, StructuredOutputsParams(json=_parameters(t))) for i, t in enumerate(tools)
            if _has_reference(_parameters(t))]


def _has_reference(schema) -> bool:
    stack = [schema]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if any(isinstance(value.get(k), str) for k in ("$ref", "$dynamicRef",
                                                           "$recursiveRef")):
                return True
            stack += value.values()
        elif isinstance(value, list):
            stack += value
    return False


def _moved_refs(schema: dict, root: str) -> dict:
    """A copy of `schema` whose local JSON-pointer references ("#" and "#/...") start at `root`
    instead of the document's root. Iterative: a schema nested thousands deep is no error.
    A subschema with an `$id` is a resource of its own: "#" under it already means that
    subschema wherever it sits, so it is copied as it is (moved, its references would point
    into a resource that has no such path)."""
    if "$id" in schema:
        return schema
    top = {}
    stack = [(schema, top, False)]  # (source, its copy, whether source maps names to schemas)
    while stack:
        source, target, names = stack.pop()
        items = source.items() if isinstance(source, dict) else enumerate(source)
        for key, value in items:
            # a map of names (properties, $defs, ...) is no schema: a property named "$id"
            # does not make it a resource of its own
            is_map = not names and isinstance(source, dict) and key in _NAME_MAPS
            if key == "$ref" and isinstance(value, str) and (value == "#"
                                                             or value.startswith("#/")):
                value = root + value[1:]
            elif isinstance(value, dict) and "$id" in value and not is_map:
                pass  # its own resource: its references are relative to it already
            elif isinstance(value, (dict, list)):
                copy = {} if isinstance(value, dict) else [None] * len(value)
                stack.append((value, copy, is_map and isinstance(value, dict)))
                value = copy
            target[key] = value
    return top


# The keywords whose value maps names to subschemas (a name there may be "$id" or "$ref")
_NAME_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions",
                        "dependentSchemas", "dependencies"})


class ToolCallParser:
    """Reads one choice's output as tool calls, whole or as it streams."""

    def __init__(self, choice: str, names: list[str], parallel: bool = True,
                 schemas: dict[str, dict] | None = None):
        self.choice, self.names = choice, set(names)
        self.parallel = parallel  # False: the first call only (parallel_tool_calls)
        self.schemas = schemas or {}  # name -> parameters: how <parameter=...> text is typed

    @property
    def named(self) -> bool:
        return self.choice not in ("auto", "none", "required")

    def forced(self) -> ForcedCalls | None:
        """A reader of the calls as they come, where the grammar forces them ("required", a
        named tool); None under "auto"."""
        if self.choice != "required" and not self.named:
            return None
        return ForcedCalls(self.choice, self.names, self.parallel)

    def finish_reason(self, reason: str, whole_calls: bool) -> str:
        """A choice's finish_reason, where the engine ended it with `reason`: "tool_calls" when
        its output was whole tool calls, but a named tool's call ends with the engine's reason
        ("stop"), as OpenAI's does; a call cut short keeps it too ("length")."""
        return "tool_calls" if whole_calls and not self.named else reason

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content left outside the calls or None, tool calls); no calls when none parse."""
        content, calls, _ = self.read(text)
        return content, calls

    def read(self, text: str) -> tuple[str | None, list[dict], bool]:
        """parse()'s (content, calls), and whether the calls are whole (finish_reason). Forced
        calls are read as a stream reads them (server/forced_calls.py), so both report the same
        calls: a cut one too, its arguments as far as they came."""
        reader = self.forced()
        if reader is not None:
            reader.feed(text)
            calls, whole = reader.finish()
            return (None, calls, whole) if calls else (text, [], False)
        content, calls = self._parse_auto(text)
        return content, calls if self.parallel else calls[:1], bool(calls)

    def _parse_auto(self, text: str) -> tuple[str | None, list[dict]]:
        if HERMES_OPEN in text:
            calls = [self._call(body.strip()) for body in _HERMES.findall(text)]
            if calls and all(calls):
                # the text before the first call as it came (as a stream sends it), or None
                content = text[: text.index(HERMES_OPEN)]
                return content if content.strip() else None, calls
            # no Hermes calls: the tag may be text inside a Llama call's arguments
        if MISTRAL_TAG in text:  # Mistral: text may come first, then the tag and the array
            before, _, after = text.partition(MISTRAL_TAG)
            calls = self._calls_in_array(after)
            if calls:
                return before if before.strip() else None, calls
        stripped = text.strip().removeprefix(LLAMA_PYTHON_TAG).lstrip()
        if stripped.startswith("{"):  # Llama 3.x: JSON objects, ";"-separated when several
            calls = [self._call(part) for part in _split_json_objects(stripped)]
            if calls and all(calls):
                return None, calls
        if stripped.startswith("["):  # Mistral's array, its tag skipped as a special token
            calls = self._calls_in_array(stripped)
            if calls:
                return None, calls
        return text, []

    def _calls_in_array(self, text: str) -> list[dict]:
        """The calls of a JSON array of {"name", "arguments"} objects; [] unless all parse."""
        try:
            items = json.loads(text)
        except (ValueError, RecursionError):
            return []
        if not isinstance(items, list) or not items:
            return []
        calls = [self._call_of(obj) for obj in items]
        return calls if all(calls) else []

    def _call(self, body: str) -> dict | None:
        if body.startswith("<function="):
            return self._xml_call(body)
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            return None
        return self._call_of(obj)

    def _xml_call(self, body: str) -> dict | None:
        """Qwen3-Coder's `<function=NAME><parameter=KEY>value</parameter>...</function>`: each
        value is text (one newline at each end dropped), typed by the tool's schema."""
        match = _XML_FUNCTION.fullmatch(body)
        if match is None or match[1] not in self.names:
            return None
        properties = self.schemas.get(match[1], {}).get("properties")
        if not isinstance(properties, dict):  # the request's schema: anything may come
            properties = {}
        args = {}
        for key, value in _XML_PARAMETER.findall(match[2]):
            value = value.removeprefix("\n").removesuffix("\n")
            args[key] = _typed(value, properties.get(key))
        rest = _XML_PARAMETER.sub("", match[2])
        return new_call(match[1], args) if not rest.strip() else None

    def _call_of(self, obj) -> dict | None:
        name = obj.get("name") if isinstance(obj, dict) else None
        if not isinstance(name, str) or name not in self.names:  # the model's text: any JSON
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as JSON text already;
            return new_call(obj["name"], args if _is_json_object(args)  # other text goes as a
                            else json.dumps(args, ensure_ascii=False))  # JSON string (as vLLM)
        return new_call(obj["name"], args) if isinstance(args, dict) else None


_XML_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.S)
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)


def _typed(text: str, schema) -> object:
    """A <parameter> value as its schema's type says (JSON for numbers, booleans, null, objects
    and arrays); as text where the schema says string, says nothing, or the text does not parse."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind in (None, "string") or isinstance(kind, list) and "string" in kind:
        return text
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return text


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: arguments must stay JSON


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


def _split_json_objects(text: str) -> list[str]:
    decoder, parts, i = json.JSONDecoder(), [], 0
    while i < len(text):
        try:
            _, end = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):
            return [text]  # not a run of objects: let the caller's parse fail on the whole
        parts.append(text[i:end])
        i = end
        while i < len(text) and text[i] in " \n\r\t;":
            i += 1
    return parts


# How much of a "{" or "[" opening is looked at to tell whether calls may follow.
_OPENING_CHARS = 64


def _may_open_calls(head: str) -> bool:
    """Whether text opening with `head` ("{" or "[" first) may still be tool calls written as
    JSON: an object whose first key follows, an array of them, or Mistral's tag spelled out."""
    if head.startswith("["):
        if MISTRAL_TAG.startswith(head[: len(MISTRAL_TAG)]):
            return True
        rest = head[1:].lstrip()
        return not rest or rest.startswith("{") and _may_open_calls(rest)
    rest = head[1:].lstrip()
    return not rest or rest.startswith('"')


class ToolCallStream:
    """One streamed choice under tools. Forced calls ("required", a named tool) go out as they
    come, one delta.tool_calls entry at a time (server/forced_calls.py). Under "auto" content
    goes out as it comes until the output may be a tool call; from there it is held, and the
    calls go out whole as delta.tool_calls when it ends."""

    def __init__(self, parser: ToolCallParser):
        self.parser = parser
        self.forced = parser.forced()
        self.pieces: list[str] = []  # the text so far, joined once it ends
        self.pending = ""  # its tail not sent yet, while not holding
        self.lead = 0  # chars of whitespace it opens with, not sent yet nor in pending
        self.num_sent = 0  # chars of text already sent as content
        self.holding = False
        # Held for opening as bare JSON calls do ("{" or "["): its first characters, until they
        # tell (then None); text that cannot be calls is let go and streams from there.
        self.opening: str | None = None
        self.let_go = False

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def feed(self, delta: str) -> list[dict]:
        """Deltas to send now for this new text. Only the tail not sent yet is looked at (the
        whole text each time made a long stream quadratic: 32,000 tokens took seconds)."""
        self.pieces.append(delta)
        if self.forced is not None:
            return [{"tool_calls": [entry]} for entry in self.forced.feed(delta)]
        if self.holding:
            if self.opening is None:
                return []
            self.opening += delta[: _OPENING_CHARS - len(self.opening)]
            return self._tell()
        if self.num_sent == 0 and not self.pending and delta.isspace():
            self.lead += len(delta)  # leading whitespace: wait to see whether a call follows
            return []
        # A tag never spans what was sent and what was not: a tail that may start one is held.
        text = self.pending + delta
        if self.num_sent == 0 and text.lstrip().startswith(LLAMA_PYTHON_TAG) \
                or HERMES_OPEN in text or MISTRAL_TAG in text:
            self.holding = True
            return []
        if self.num_sent == 0 and not self.let_go and text.lstrip().startswith(("{", "[")):
            self.holding, self.opening = True, text.lstrip()[:_OPENING_CHARS]
            return self._tell()
        # Hold a tail that may be the start of a call's opening tag.
        keep = max((k for tag in (HERMES_OPEN, LLAMA_PYTHON_TAG, MISTRAL_TAG)
                    for k in range(min(len(text), len(tag) - 1), 0, -1)
                    if tag.startswith(text[-k:])), default=0)
        if self.num_sent == 0 and not text[: len(text) - keep].strip():
            keep = len(text)  # leading whitespace: wait to see whether a call follows
        end = len(text) - keep
        self.pending = text[end:]
        if end == 0:
            return []
        if self.num_sent == 0:  # the leading whitespace goes out with the first content
            text = self.text[: self.lead] + text
            end += self.lead
        self.num_sent += end
        return [{"content": text[:end]}]

    def _tell(self) -> list[dict]:
        """While held for its opening: go on holding while that may open calls (until enough
        of it has come to tell), else let the text go, fed again as content."""
        if _may_open_calls(self.opening):
            if len(self.opening) >= _OPENING_CHARS:
                self.opening = None  # it may be calls: held to the end
            return []
        text = self.text
        self.pieces, self.pending, self.lead = [], "", 0
        self.holding, self.opening, self.let_go = False, None, True
        return self.feed(text)

    def finish(self) -> tuple[list[dict], bool]:
        """(deltas to send at the end, whether the output was whole tool calls: see
        ToolCallParser.finish_reason)."""
        text = self.text
        if self.forced is not None:
            calls, whole = self.forced.finish()
            if calls:  # all sent already
                return [], whole
            return ([{"content": text}] if text else []), False  # no call began: content
        content, calls = self.parser.parse(text)
        deltas = []
        if calls:
            held = (content or "")[self.num_sent:] if content else ""
            if held:
                deltas.append({"content": held})
            deltas.append({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
            return deltas, True
        if len(text) > self.num_sent:
            deltas.append({"content": text[self.num_sent:]})
        return deltas, False
