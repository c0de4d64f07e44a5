"""Structured output over HTTP, read by the official `openai` and `anthropic` packages, on a real
server running the tiny random GLM-4.5V (its template has tools): JSON that validates, forced
tool calls with valid arguments, whole and streamed, in all three dialects; a bad schema is a 400
in the dialect's shape and the next request is served."""

import json

import anthropic
import httpx
import jsonschema
import pytest
from helpers import FORMATS
from schemas import SCHEMAS
from servers import Server

openai = pytest.importorskip("openai")

SCHEMA = SCHEMAS[53]  # the receipt
BAD = {"type": "array", "uniqueItems": True}
PARAMS = {
    "type": "object",
    "required": ["x", "y"],
    "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 1000},
        "y": {"type": "integer", "minimum": 0, "maximum": 1000},
        "button": {"type": "string", "enum": ["left", "right"]},
    },
}
NOTE = {
    "type": "object",
    "required": ["text"],
    "properties": {"text": {"type": "string", "maxLength": 8}},
}
CHAT_TOOLS = [
    {"type": "function", "function": {"name": "click", "parameters": PARAMS}},
    {"type": "function", "function": {"name": "note", "parameters": NOTE}},
]
FLAT_TOOLS = [
    {"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
    for t in CHAT_TOOLS
]
ANTHROPIC_TOOLS = [
    {"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in CHAT_TOOLS
]
SCHEMAS_BY_TOOL = {"click": PARAMS, "note": NOTE}
MAX = 160


@pytest.fixture(scope="module")
def server(glm4v_moe_checkpoint, tmp_path_factory):
    s = Server(
        glm4v_moe_checkpoint[0],
        ["--keepalive", "0.05"],
        tmp_path_factory.mktemp("structured") / "server.log",
    )
    s.anthropic = anthropic.Anthropic(base_url=s.url, api_key="unused", max_retries=0, timeout=60)
    yield s
    s.close()


def chat(server, **options):
    options = {
        "temperature": 0,
        "max_completion_tokens": MAX,
        "extra_body": {"thinking_budget": 4},
        **options,
    }
    return server.client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Read the receipt."}], **options
    )


def test_chat_completions_json_schema(server):
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "receipt", "schema": SCHEMA, "strict": True},
    }
    whole = chat(server, response_format=fmt)
    assert whole.choices[0].finish_reason == "stop"
    jsonschema.validate(
        json.loads(whole.choices[0].message.content), SCHEMA, format_checker=FORMATS
    )
    assert whole.choices[0].message.reasoning_content  # it thought first, freely
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in chat(server, response_format=fmt, stream=True)
        if c.choices
    )
    assert streamed == whole.choices[0].message.content


def test_chat_completions_bad_schema_then_served(server):
    bad = server.post(
        {
            "model": server.model,
            "messages": [{"role": "user", "content": "Hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": BAD}},
        }
    )
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert (
        error["param"] == "response_format.json_schema.schema" and "uniqueItems" in error["message"]
    )
    assert chat(server, max_completion_tokens=4).choices[0].finish_reason == "length"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "note"}}])
def test_chat_completions_forced_tool_call(server, choice):
    whole = chat(server, tools=CHAT_TOOLS, tool_choice=choice)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1
    call = message.tool_calls[0].function
    assert choice == "required" or call.name == "note"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS_BY_TOOL[call.name])
    chunks = list(chat(server, tools=CHAT_TOOLS, tool_choice=choice, stream=True))
    deltas = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == call.name
    assert "".join(d.function.arguments or "" for d in deltas) == call.arguments


def test_responses_text_format_and_forced_call(server):
    base = dict(
        model=server.model,
        input="Read the receipt.",
        temperature=0,
        max_output_tokens=MAX,
        reasoning={"effort": "none"},
    )
    fmt = {"format": {"type": "json_schema", "name": "receipt", "schema": SCHEMA, "strict": True}}
    whole = server.client.responses.create(text=fmt, **base)
    assert whole.status == "completed"
    jsonschema.validate(json.loads(whole.output_text), SCHEMA, format_checker=FORMATS)
    events = list(server.client.responses.create(text=fmt, stream=True, **base))
    assert events[-1].response.output_text == whole.output_text
    for stream in (False, True):
        out = server.client.responses.create(
            tools=FLAT_TOOLS,
            tool_choice={"type": "function", "name": "click"},
            stream=stream,
            **base,
        )
        response = list(out)[-1].response if stream else out
        calls = [i for i in response.output if i.type == "function_call"]
        assert len(calls) == 1 and calls[0].name == "click"
        jsonschema.validate(json.loads(calls[0].arguments), PARAMS)
    bad = httpx.post(
        f"{server.url}/v1/responses",
        json={**base, "text": {"format": {"type": "json_schema", "name": "x", "schema": BAD}}},
        timeout=30,
    )
    assert bad.status_code == 400 and "uniqueItems" in bad.json()["error"]["message"]
    assert server.client.responses.create(**{**base, "max_output_tokens": 4}).status == "incomplete"


def test_anthropic_output_format_and_forced_tool(server):
    greedy = {"temperature": 0}  # through extra_body: this SDK's create() no longer names it
    base = dict(
        model=server.model,
        max_tokens=MAX,
        messages=[{"role": "user", "content": "Read the receipt."}],
        thinking={"type": "enabled", "budget_tokens": 4},
        extra_body=greedy,
    )
    fmt = {"format": {"type": "json_schema", "schema": SCHEMA}}
    whole = server.anthropic.messages.create(
        **{**base, "extra_body": {**greedy, "output_config": fmt}}
    )
    assert whole.stop_reason == "end_turn"
    text = "".join(b.text for b in whole.content if b.type == "text")
    jsonschema.validate(json.loads(text), SCHEMA, format_checker=FORMATS)
    assert any(b.type == "thinking" for b in whole.content)
    beta = server.anthropic.messages.create(
        **{**base, "extra_body": {**greedy, "output_format": fmt["format"]}}
    )
    assert "".join(b.text for b in beta.content if b.type == "text") == text
    with server.anthropic.messages.stream(
        tools=ANTHROPIC_TOOLS, tool_choice={"type": "any"}, **base
    ) as stream:
        final = stream.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and len(uses) == 1
    jsonschema.validate(uses[0].input, SCHEMAS_BY_TOOL[uses[0].name])
    named = server.anthropic.messages.create(
        tools=ANTHROPIC_TOOLS, tool_choice={"type": "tool", "name": "note"}, **base
    )
    assert [b.name for b in named.content if b.type == "tool_use"] == ["note"]
    body = {k: v for k, v in base.items() if k != "extra_body"}
    bad = httpx.post(
        f"{server.url}/v1/messages",
        json={**body, "output_config": {"format": {"type": "json_schema", "schema": BAD}}},
        headers={"x-api-key": "unused"},
        timeout=30,
    )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert "uniqueItems" in bad.json()["error"]["message"]
    assert server.anthropic.messages.create(**{**base, "max_tokens": 4}).stop_reason == "max_tokens"
