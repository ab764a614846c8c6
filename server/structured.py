"""Structured outputs over HTTP: OpenAI's `response_format` and vLLM's `structured_outputs` body
field read into StructuredOutputsParams, and the grammar compiled before the request is submitted,
so a schema that does not compile is this call's 400 (naming the field and llguidance's reason)
and never a 200 with unconstrained text.
"""

from __future__ import annotations

import asyncio

from engine.core.sampling_params import ParamError, StructuredOutputsParams
from server.protocol import bad_request, get_field

# vLLM's former structured-output fields (replaced by `structured_outputs`): refused by name,
# as protocol.UNSUPPORTED_VLLM_FIELDS are, so a client still sending them never gets free text.
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar", "guided_json_object": "json_object"}


def parse_structured_outputs(body: dict) -> tuple[StructuredOutputsParams | None, str | None]:
    """(what the output must match, the body field it came from), or (None, None)."""
    for name, kind in _GUIDED_FIELDS.items():
        if body.get(name) is not None:
            raise bad_request(name, f"'{name}' (vLLM's former field) is not supported by this "
                                    f"server: send 'structured_outputs': {{'{kind}': ...}}")
    response_format = get_field(body, "response_format", "dict")
    vllm = get_field(body, "structured_outputs", "dict")
    if response_format is not None and vllm is not None:
        raise bad_request("structured_outputs", "give either 'response_format' or "
                                                "'structured_outputs', not both")
    if vllm is not None:
        try:
            return StructuredOutputsParams(**vllm), "structured_outputs"
        except TypeError:
            raise bad_request("structured_outputs", "'structured_outputs' takes one of json, "
                              f"regex, choice, grammar, json_object; got {sorted(vllm)}") from None
        except ValueError as e:
            raise bad_request("structured_outputs", str(e)) from None
    if response_format is None:
        return None, None
    kind = response_format.get("type")
    if kind == "text":
        return None, None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True), "response_format"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise bad_request("response_format", "'response_format.json_schema' must be an "
                                                 "object with a string 'name'")
        if not isinstance(spec.get("strict", False), bool | None):
            raise bad_request("response_format", "'response_format.json_schema.strict' must be "
                                                 f"true or false, got {spec['strict']!r}")
        schema = spec.get("schema")
        if schema is None:  # OpenAI allows it: then any JSON object
            return StructuredOutputsParams(json_object=True), "response_format"
        if not isinstance(schema, dict):
            raise bad_request("response_format", "'response_format.json_schema.schema' must be "
                                                 "a JSON schema object")
        return StructuredOutputsParams(json=schema), "response_format"
    raise bad_request("response_format", "'response_format.type' must be 'text', 'json_object' "
                                         f"or 'json_schema', got {kind!r}")


async def check_compiles(engine, so: StructuredOutputsParams, field: str,
                         allowed_token_ids: list[int] | None = None) -> None:
    """Compile `so` on a worker thread (the event loop never waits on llguidance); a grammar that
    does not compile is a 400 naming `field`, and `allowed_token_ids` none of which may begin
    the output one naming that field. The compiled grammar stays in the engine's cache."""
    if engine.grammars is None:
        raise bad_request(field, f"'{field}' needs the model's tokenizer, and this model has none")
    try:
        await asyncio.to_thread(engine.grammars.check, so, allowed_token_ids)
    except ParamError as e:
        raise bad_request(e.field, f"'{e.field}' and '{field}': {e}") from None
    except ValueError as e:
        raise bad_request(field, f"'{field}': {e}") from None
