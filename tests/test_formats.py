"""The server's structured-output fields of each API, turned into constraints or refused naming
the field."""

import pytest

from mlx_glm4v.generation.constrain import Constraint
from mlx_glm4v.server.formats import (
    FormatError,
    anthropic_output_format,
    anthropic_tool_choice,
    one_constraint,
    openai_response_format,
    openai_tool_choice,
    responses_text_format,
    responses_tool_choice,
)

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
BAD = {"type": "object", "unevaluatedProperties": False}
PARAMS = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}


def test_openai_response_format():
    assert openai_response_format(None) is None and openai_response_format({"type": "text"}) is None
    assert openai_response_format({"type": "json_object"}).kind == "json_object"
    c = openai_response_format(
        {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}}
    )
    assert (c.kind, c.spec) == ("json_schema", SCHEMA)


def test_responses_and_anthropic_formats():
    c = responses_text_format(
        {"format": {"type": "json_schema", "name": "n", "schema": SCHEMA, "strict": False}}
    )
    assert (c.kind, c.spec) == ("json_schema", SCHEMA)
    assert responses_text_format({"format": {"type": "text"}, "verbosity": "low"}) is None
    assert responses_text_format({"format": {"type": "json_object"}}).kind == "json_object"
    c = anthropic_output_format({"type": "json_schema", "schema": SCHEMA})
    assert (c.kind, c.spec) == ("json_schema", SCHEMA)
    c = anthropic_output_format({"type": "json_schema", "schema": SCHEMA}, "output_format")
    assert c.spec == SCHEMA


@pytest.mark.parametrize(
    "call, param, words",
    [
        (
            lambda: openai_response_format(
                {"type": "json_schema", "json_schema": {"name": "n", "schema": BAD}}
            ),
            "response_format.json_schema.schema",
            "unevaluatedProperties",
        ),
        (
            lambda: openai_response_format(
                {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
            ),
            "response_format.json_schema.name",
            "name",
        ),
        (lambda: openai_response_format({"type": "xml"}), "response_format", "'xml'"),
        (lambda: openai_response_format("json"), "response_format", "object with a type"),
        (
            lambda: responses_text_format(
                {"format": {"type": "json_schema", "name": "n", "schema": BAD}}
            ),
            "text.format.schema",
            "unevaluatedProperties",
        ),
        (
            lambda: responses_text_format(
                {"format": {"type": "json_schema", "name": "n", "schema": SCHEMA, "strict": "yes"}}
            ),
            "text.format.strict",
            "true or false",
        ),
        (
            lambda: anthropic_output_format({"type": "json_schema", "schema": BAD}),
            "output_config.format.schema",
            "unevaluatedProperties",
        ),
        (
            lambda: anthropic_output_format({"type": "json_schema"}),
            "output_config.format.schema",
            "required",
        ),
        (lambda: openai_tool_choice("required", []), "tool_choice", "no tools"),
        (
            lambda: openai_tool_choice(
                {"type": "function", "function": {"name": "g"}},
                [{"type": "function", "function": {"name": "f", "parameters": PARAMS}}],
            ),
            "tool_choice",
            "'g'",
        ),
        (lambda: openai_tool_choice("sometimes", []), "tool_choice", "required"),
        (
            lambda: anthropic_tool_choice(
                {"type": "tool", "name": "g"}, [{"name": "f", "input_schema": PARAMS}]
            ),
            "tool_choice",
            "'g'",
        ),
        (
            lambda: responses_tool_choice(
                "required",
                [{"type": "function", "name": "f", "parameters": {"properties": {"x": BAD}}}],
            ),
            "tool_choice",
            "unevaluatedProperties",
        ),
        (
            lambda: one_constraint(
                Constraint("json_object"),
                Constraint("tool_call", [{"name": "f"}]),
                "response_format",
            ),
            "response_format",
            "cannot be combined",
        ),
    ],
)
def test_refusals_name_the_field(call, param, words):
    with pytest.raises(FormatError) as e:
        call()
    assert e.value.param == param and words in e.value.message and "\n" not in e.value.message


def test_tool_choices_force_the_named_or_any_tool():
    chat_tools = [
        {"type": "function", "function": {"name": "f", "parameters": PARAMS}},
        {"type": "function", "function": {"name": "g"}},
    ]
    assert (
        openai_tool_choice("auto", chat_tools) is None
        and openai_tool_choice("none", chat_tools) is None
    )
    c = openai_tool_choice("required", chat_tools)
    assert (c.kind, c.name, [t["name"] for t in c.spec]) == ("tool_call", None, ["f", "g"])
    assert (
        openai_tool_choice({"type": "function", "function": {"name": "g"}}, chat_tools).name == "g"
    )
    flat = [{"type": "function", "name": "f", "parameters": PARAMS}, {"type": "web_search"}]
    assert responses_tool_choice({"type": "function", "name": "f"}, flat).spec == [
        {"name": "f", "parameters": PARAMS}
    ]
    assert responses_tool_choice("required", flat).name is None
    anthropic = [{"name": "f", "input_schema": PARAMS}]
    assert anthropic_tool_choice({"type": "auto"}, anthropic) is None
    assert anthropic_tool_choice({"type": "any"}, anthropic).spec == [
        {"name": "f", "parameters": PARAMS}
    ]
    assert anthropic_tool_choice({"type": "tool", "name": "f"}, anthropic).name == "f"
