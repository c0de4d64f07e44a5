"""Structured output as each API asks for it, turned into one `Constraint` (pure functions).

Chat completions: `response_format` json_object / json_schema {name, schema, strict}, and
`tool_choice` "required" or {"type": "function", "function": {"name"}}. Responses: `text.format`
(the same formats, flattened) and `tool_choice` "required" or {"type": "function", "name"}.
Anthropic Messages: `output_config.format` (and the older beta `output_format`) json_schema
{schema}, and `tool_choice` {"type": "any"} or {"type": "tool", "name"}. Ollama: `format` "json" or
a schema. Every constraint is
compiled here, so a schema the engine cannot take is a `FormatError` (a 400) naming the field
and the keyword before the request reaches the engine. `strict` is accepted either way: the
schema is always enforced.
"""

import re
from typing import Optional

from ..errors import Glm4vError
from ..generation.constrain import Constraint

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class FormatError(Glm4vError):
    """A structured-output field the server refuses: one sentence and the field (`param`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message, self.param = message, param


def _checked(constraint: Constraint, param: str) -> Constraint:
    try:
        _ = constraint.grammar  # the property compiles and checks it
    except Glm4vError as e:
        raise FormatError(f"{param}: {e}", param) from None
    return constraint


def _schema(fmt: dict, param: str, key: str = "schema") -> Constraint:
    schema = fmt.get(key, {})
    if not isinstance(schema, dict):
        raise FormatError(f"{param}.{key} must be a JSON Schema object.", f"{param}.{key}")
    strict = fmt.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise FormatError(f"{param}.strict must be true or false.", f"{param}.strict")
    return _checked(Constraint("json_schema", schema), f"{param}.{key}")


def _kind(fmt, param: str) -> Optional[str]:
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise FormatError(f"{param} must be an object with a type.", param)
    return fmt["type"]


def openai_response_format(fmt, param: str = "response_format") -> Optional[Constraint]:
    """Chat completions' `response_format`: None for text."""
    kind = _kind(fmt, param)
    if kind == "json_schema":  # name and schema sit one level down here
        fmt, param = fmt.get("json_schema"), f"{param}.json_schema"
        if not isinstance(fmt, dict):
            raise FormatError(f"{param} must be an object with name and schema.", param)
    return _text_or_json(kind, fmt, param)


def responses_text_format(text, param: str = "text") -> Optional[Constraint]:
    """The Responses API's `text` ({"format": {"type", "name", "schema", "strict"}}): None for
    text."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise FormatError(f"{param} must be an object.", param)
    fmt, param = text.get("format"), f"{param}.format"
    return _text_or_json(_kind(fmt, param), fmt, param)


def _text_or_json(kind: Optional[str], spec, param: str) -> Optional[Constraint]:
    """The choice chat completions and Responses share: text (None), any JSON object, or the
    schema named in `spec`."""
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind != "json_schema":
        raise FormatError(
            f"{param} type {kind!r} is not supported; use text, json_object or json_schema.", param
        )
    _name(spec, param)
    return _schema(spec, param)


def anthropic_output_format(fmt, param: str = "output_config.format") -> Optional[Constraint]:
    """Anthropic's `output_config.format` (or the beta `output_format`): {"type": "json_schema",
    "schema"}."""
    kind = _kind(fmt, param)
    if kind is None:
        return None
    if kind != "json_schema":
        raise FormatError(f"{param} type {kind!r} is not supported; use json_schema.", param)
    if "schema" not in fmt:
        raise FormatError(f"{param}.schema is required.", f"{param}.schema")
    return _schema(fmt, param)


def ollama_format(fmt, param: str = "format") -> Optional[Constraint]:
    """Ollama's `format`: "json" (any JSON object), a JSON Schema object, or nothing ("" or
    null)."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return Constraint("json_object")
    if not isinstance(fmt, dict):
        raise FormatError(f'{param} must be "json" or a JSON Schema object.', param)
    return _checked(Constraint("json_schema", fmt), param)


def _name(spec: dict, param: str):
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise FormatError(
            f"{param}.name must be 1-64 letters, digits, underscores or dashes.", f"{param}.name"
        )


def _forced(tools: list, name: Optional[str], param: str) -> Constraint:
    if not tools:
        raise FormatError(f"{param} forces a tool call but no tools are given.", param)
    if name is not None and name not in {t["name"] for t in tools}:
        raise FormatError(f"{param} names the tool {name!r}, which is not among the tools.", param)
    return _checked(Constraint("tool_call", tools, name), param)


def _functions(tools) -> list:
    """Tools as {"name", "parameters"}, from any dialect's form: chat completions' {"type":
    "function", "function": {...}}, the Responses API's flat {"type": "function", "name",
    "parameters"}, or Anthropic's {"name", "input_schema"}; other kinds (hosted tools) are left
    out."""
    out = []
    for tool in tools or []:
        if not isinstance(tool, dict):
            continue
        if isinstance(tool.get("function"), dict):
            fn = tool["function"]
        elif "input_schema" in tool:
            fn = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        else:
            fn = tool if tool.get("type", "function") == "function" else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out.append({"name": fn["name"], "parameters": fn.get("parameters") or {}})
    return out


def openai_tool_choice(choice, tools, param: str = "tool_choice") -> Optional[Constraint]:
    """Chat completions: "required" (some tool) or {"type": "function", "function": {"name"}};
    None otherwise."""
    functions = _functions(tools)
    if choice in (None, "auto", "none"):
        return None
    if choice == "required":
        return _forced(functions, None, param)
    fn = (
        choice.get("function")
        if isinstance(choice, dict) and choice.get("type") == "function"
        else None
    )
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise FormatError(
            f'{param} must be "auto", "none", "required" or {{"type": "function", '
            f'"function": {{"name": ...}}}}.',
            param,
        )
    return _forced(functions, fn["name"], param)


def responses_tool_choice(choice, tools, param: str = "tool_choice") -> Optional[Constraint]:
    """Responses: "required" or {"type": "function", "name"}; None otherwise."""
    functions = _functions(tools)
    if choice in (None, "auto", "none"):
        return None
    if choice == "required":
        return _forced(functions, None, param)
    if (
        not isinstance(choice, dict)
        or choice.get("type") != "function"
        or not isinstance(choice.get("name"), str)
    ):
        raise FormatError(
            f'{param} must be "auto", "none", "required" or {{"type": "function", "name": ...}}.',
            param,
        )
    return _forced(functions, choice["name"], param)


def anthropic_tool_choice(choice, tools, param: str = "tool_choice") -> Optional[Constraint]:
    """Anthropic: {"type": "any"} or {"type": "tool", "name"}; None for auto and none."""
    functions = _functions(tools)
    kind = choice.get("type") if isinstance(choice, dict) else None
    if choice is None or kind in ("auto", "none"):
        return None
    if kind == "any":
        return _forced(functions, None, param)
    if kind == "tool" and isinstance(choice.get("name"), str):
        return _forced(functions, choice["name"], param)
    raise FormatError(
        f'{param} must be {{"type": "auto"}}, {{"type": "any"}}, {{"type": "none"}} or '
        f'{{"type": "tool", "name": ...}}.',
        param,
    )


def one_constraint(
    output: Optional[Constraint], tool: Optional[Constraint], param: str
) -> Optional[Constraint]:
    """The request's constraint: a forced tool call and a response format cannot both hold."""
    if output is not None and tool is not None:
        raise FormatError(
            f"{param} cannot be combined with a forced tool call: the reply is either the call "
            "or the formatted answer.",
            param,
        )
    return output or tool
