"""The one parser of GLM's replies (reply.ReplyParser): thinking, answer and tool calls as events,
the arguments streamed as JSON fragments typed by the tool's schema; and what the real agents
send (bodies captured from Codex CLI 0.171 and Claude Code 2.1.332, tests/captures/) parsed by
the dialects into the neutral request."""

import json
from pathlib import Path

import pytest

from mlx_glm4v.generation.reply import (
    Content,
    Reasoning,
    ReplyParser,
    ToolArgs,
    ToolEnd,
    ToolStart,
    parse_reply,
)
from mlx_glm4v.server import anthropic, openai, responses
from mlx_glm4v.server.neutral import ApiError, Served
from mlx_glm4v.serving.engine import Usage as EngineUsage

CAPTURES = Path(__file__).parent / "captures"
SCHEMA = {
    "type": "function",
    "function": {
        "name": "book",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "note": {"type": ["string", "null"]},
                "days": {"type": "integer"},
                "flex": {"type": "boolean"},
                "extra": {"type": "object"},
            },
        },
    },
}

CASES = {
    "typed values": (
        '<tool_call>book\n<arg_key>city</arg_key>\n<arg_value>Nice "old" town\\n</arg_value>\n'
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n<arg_key>flex</arg_key>"
        '<arg_value>true</arg_value><arg_key>extra</arg_key><arg_value>{"a": [1, 2]}</arg_value>'
        "<arg_key>note</arg_key><arg_value>42</arg_value></tool_call>",
        {
            "city": 'Nice "old" town\\n',
            "days": 3,
            "flex": True,
            "extra": {"a": [1, 2]},
            "note": "42",
        },
    ),
    "not JSON where JSON was due": (
        "<tool_call>book<arg_key>days</arg_key><arg_value>three</arg_value></tool_call>",
        {"days": "three"},
    ),
    "a parameter the schema lacks": (
        "<tool_call>book<arg_key>n</arg_key><arg_value>7</arg_value>"
        "<arg_key>s</arg_key><arg_value>x y</arg_value></tool_call>",
        {"n": 7, "s": "x y"},
    ),
    "no arguments": ("<tool_call>book</tool_call>", {}),
    "JSON form": (
        '<tool_call>{"name": "book", "arguments": {"city": "Oslo", "days": 2}}</tool_call>',
        {"city": "Oslo", "days": 2},
    ),
    "unicode": (
        "<tool_call>book<arg_key>city</arg_key><arg_value>Zürich 🙂</arg_value></tool_call>",
        {"city": "Zürich 🙂"},
    ),
}


def run(text, size, tools=(SCHEMA,)):
    parser = ReplyParser(list(tools))
    events = [e for i in range(0, len(text), size) for e in parser.feed(text[i : i + size])]
    return events + parser.finish()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_fragments_add_up_to_the_arguments(case, size):
    text, want = CASES[case]
    events = run("<think>Plan.</think>Sure. " + text + " Done.", size)
    starts = [e for e in events if isinstance(e, ToolStart)]
    ends = [e for e in events if isinstance(e, ToolEnd)]
    assert [(s.index, s.name) for s in starts] == [(0, "book")] and ends[0].id == starts[0].id
    fragments = [e.text for e in events if isinstance(e, ToolArgs)]
    assert "".join(fragments) == ends[0].arguments and json.loads(ends[0].arguments) == want
    assert ends[0].arguments == json.dumps(want, ensure_ascii=False)
    # the start comes before any fragment, the fragments before the end
    kinds = [type(e).__name__ for e in events if isinstance(e, (ToolStart, ToolArgs, ToolEnd))]
    assert kinds[0] == "ToolStart" and kinds[-1] == "ToolEnd" and set(kinds[1:-1]) == {"ToolArgs"}
    assert "".join(e.text for e in events if isinstance(e, Content)) == "Sure.  Done."
    assert "".join(e.text for e in events if isinstance(e, Reasoning)) == "Plan."
    whole = parse_reply("<think>Plan.</think>Sure. " + text + " Done.", [SCHEMA])
    assert (whole.content, [c.arguments for c in whole.calls]) == (
        "Sure.  Done.",
        [ends[0].arguments],
    )


def test_the_call_starts_when_its_name_line_is_complete():
    parser = ReplyParser([SCHEMA])
    assert parser.feed("<tool_call>bo") == []
    events = parser.feed("ok\n<arg_key>ci")
    assert [type(e) for e in events] == [ToolStart, ToolArgs] and events[0].name == "book"
    streamed = parser.feed("ty</arg_key><arg_value>Ro")
    assert "".join(e.text for e in streamed) == '{"city": "Ro'[1:]


def test_a_call_cut_short_is_closed_and_a_nameless_one_stays_text():
    events = run("<tool_call>book<arg_key>city</arg_key><arg_value>Par", 3)
    end = next(e for e in events if isinstance(e, ToolEnd))
    assert json.loads(end.arguments) == {"city": "Par"}
    assert parse_reply("x <tool_call>bo", [SCHEMA]).content == "x <tool_call>bo"
    assert (
        parse_reply("x <tool_call>{not json}</tool_call>", [SCHEMA]).content
        == "x <tool_call>{not json}</tool_call>"
    )
    assert (
        parse_reply("no tools <tool_call>book</tool_call>").content
        == "no tools <tool_call>book</tool_call>"
    )


def test_two_calls_have_their_own_indexes():
    text = (
        "<tool_call>book<arg_key>days</arg_key><arg_value>1</arg_value></tool_call>\n"
        "<tool_call>book</tool_call>"
    )
    ends = [e for e in run(text, 4) if isinstance(e, ToolEnd)]
    assert [(e.index, e.arguments) for e in ends] == [(0, '{"days": 1}'), (1, "{}")] and ends[
        0
    ].id != ends[1].id


SERVED = Served(
    "glm-tiny",
    {"glm-tiny"},
    tools_supported=True,
    thinking_in_template=True,
    thinking_switch=True,
    store=responses.Store(4, 1 << 20),
)


def test_codex_requests_parse():
    for name in ("codex_responses.json", "codex_image.json"):
        body = json.loads((CAPTURES / name).read_text())
        request = responses.parse(body, SERVED)
        names = [t["function"]["name"] for t in request.tools]
        assert "exec_command" in names and len(names) == 7  # the namespace and web_search left out
        assert [m["role"] for m in request.messages] == ["system", "system", "user", "user"]
        assert request.stream and request.options["sealed"] and not request.options["store"]
    images = [p for p in request.messages[-1]["content"] if p["type"] == "image"]
    assert (
        len(images) == 1
        and images[0]["detail"] == "high"
        and images[0]["source"].startswith("data:image/png")
    )


def test_claude_code_request_parses():
    body = json.loads((CAPTURES / "claude_messages.json").read_text())
    request = anthropic.parse(body, SERVED)
    assert [m["role"] for m in request.messages] == ["system", "user", "system"]
    assert "x-anthropic-billing-header" not in request.messages[0]["content"]
    names = [t["function"]["name"] for t in request.tools]
    assert "Bash" in names and "DeferredToolPlaceholder" not in names
    assert request.settings["max_tokens"] == 32000 and request.options["omit_thinking"]
    with pytest.raises(ApiError) as refused:
        anthropic.parse({**body, "model": "claude-haiku-4-5"}, SERVED)
    assert refused.value.status == 404
    anyone = Served(**{**SERVED.__dict__, "answer_any_model": True})
    assert anthropic.parse({**body, "model": "claude-haiku-4-5"}, anyone).tools


@pytest.mark.parametrize("tools", [[3], ["book"], [None]])
def test_a_tool_that_is_not_an_object_is_refused_in_every_dialect(tools):
    """A 400 naming the tool, never a crash (chat completions read `.get` off any tool once)."""
    bodies = {
        openai: {"model": "glm-tiny", "messages": [{"role": "user", "content": "Hi"}]},
        responses: {"model": "glm-tiny", "input": "Hi"},
        anthropic: {
            "model": "glm-tiny",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "Hi"}],
        },
    }
    for dialect, body in bodies.items():
        with pytest.raises(ApiError) as refused:
            dialect.parse({**body, "tools": tools}, SERVED)
        assert (refused.value.status, refused.value.param) == (400, "tools[0]"), dialect.__name__


def tokens(processor, request) -> list:
    kwargs = dict(request.template_kwargs)
    if request.tools:
        kwargs.update(tools=request.tools, tool_choice=request.tool_choice)
    text = processor.apply_chat_template(request.messages, add_generation_prompt=True, **kwargs)
    return processor(text)["input_ids"][0].tolist()


def test_agent_turns_render_byte_stable(glm4v_moe_checkpoint):
    """The real agents' second turn (their first resent, our reply and the tool's result added)
    starts with every token of the first: the prefix cache can serve all of it (part 5 of issue
    18)."""
    from mlx_glm4v.inputs.processor import Processor
    from mlx_glm4v.server.neutral import Finish, Meta

    processor = Processor.from_pretrained(glm4v_moe_checkpoint[0])
    reply = (
        "<think>Look first.</think>I will list.<tool_call>Bash\n<arg_key>command</arg_key>\n"
        "<arg_value>ls -la</arg_value>\n</tool_call>"
    )

    def Usage():  # the engine's own, as a finished reply carries it
        return EngineUsage(prompt_tokens=1, completion_tokens=1, cached_tokens=0)

    def events(request):
        parser = ReplyParser(request.tools)
        return parser.feed(reply) + parser.finish() + [Finish("tool_calls", Usage())]

    body = json.loads((CAPTURES / "claude_messages.json").read_text())
    first = anthropic.parse(body, SERVED)
    message = anthropic.whole(first, events(first), Meta("msg_1", 0, "glm-tiny", 1, SERVED))
    use = next(b for b in message["content"] if b["type"] == "tool_use")
    body["messages"] += [
        {"role": "assistant", "content": message["content"]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "a.txt"}],
        },
    ]
    second = anthropic.parse(body, SERVED)
    one, two = tokens(processor, first), tokens(processor, second)
    assert two[: len(one)] == one and len(one) / len(two) > 0.99

    body = json.loads((CAPTURES / "codex_responses.json").read_text())
    first = responses.parse(body, SERVED)
    response = responses.whole(first, events(first), Meta("resp_1", 0, "glm-tiny", 1, SERVED))
    call = next(i for i in response["output"] if i["type"] == "function_call")
    assert next(i for i in response["output"] if i["type"] == "reasoning")["encrypted_content"]
    body["input"] += response["output"] + [
        {"type": "function_call_output", "call_id": call["call_id"], "output": "a.txt"}
    ]
    second = responses.parse(body, SERVED)
    # restored from encrypted_content
    assert second.messages[-2]["reasoning_content"] == "Look first."
    one, two = tokens(processor, first), tokens(processor, second)
    assert two[: len(one)] == one and len(one) / len(two) > 0.99


def test_response_store_is_bounded_by_count_and_bytes():
    store = responses.Store(count=3, max_bytes=10_000)
    for i in range(5):
        store.put(f"r{i}", {"id": f"r{i}"}, [])
    assert list(store.items) == ["r2", "r3", "r4"]
    store.put("big", {"text": "x" * 9_970}, [])
    assert list(store.items) == ["r4", "big"] and store.bytes <= 10_000
    assert (
        store.pop("big") is not None
        and store.get("big") is None
        and store.bytes == len('{"id": "r4"}') + 2
    )


def validator(union):
    """Validate an event strictly by the SDK's model for its `type`."""
    import typing

    args = typing.get_args(union)
    while len(args) == 1 or (args and not hasattr(args[0], "model_fields")):
        args = typing.get_args(args[0])
    models = {typing.get_args(m.model_fields["type"].annotation)[0]: m for m in args}
    return lambda event: models[event["type"]].model_validate(event)


def rendered(dialect, request, events, failure=None):
    from mlx_glm4v.server.neutral import Meta

    stream = dialect.Stream(request, Meta(dialect.reply_id(), 0, "glm-tiny", 9, SERVED))
    lines = (
        stream.head()
        + stream.feed(events)
        + (stream.fail(failure) if failure else [])
        + stream.tail()
    )
    return [json.loads(line.split("data: ", 1)[1]) for line in lines if "data: " in line]


@pytest.mark.parametrize(
    "failure", [None, ApiError(504, "the request ran past the server's limit.", code="timeout")]
)
def test_streams_validate_as_the_sdks_typed_events(failure):
    """Every event both dialects stream, validated strictly by the official SDKs' own event
    models."""
    from anthropic.types import RawMessageStreamEvent
    from openai.types.responses import ResponseStreamEvent

    from mlx_glm4v.server.neutral import Finish

    def Usage():  # the engine's own, as a finished reply carries it
        return EngineUsage(prompt_tokens=9, completion_tokens=7, cached_tokens=4)

    text = (
        "<think>Plan.</think>Sure.<tool_call>book<arg_key>city</arg_key><arg_value>Oslo</arg_value>"
        "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>"
    )
    parser = ReplyParser([SCHEMA])
    events = parser.feed(text) + parser.finish()
    events += [] if failure else [Finish("tool_calls", Usage(), reasoning_tokens=3)]
    body = {
        "model": "glm-tiny",
        "input": "Hi",
        "tools": [
            {"type": "function", "name": "book", "parameters": SCHEMA["function"]["parameters"]}
        ],
        "include": ["reasoning.encrypted_content"],
        "store": False,
    }
    validate = validator(ResponseStreamEvent)
    out = [validate(e) for e in rendered(responses, responses.parse(body, SERVED), events, failure)]
    assert out[-1].type == ("response.failed" if failure else "response.completed")
    if not failure:
        assert [i.type for i in out[-1].response.output] == [
            "reasoning",
            "message",
            "function_call",
        ]
        assert out[-1].response.output[2].arguments == '{"city": "Oslo", "days": 2}'
        assert out[-1].response.usage.output_tokens_details.reasoning_tokens == 3
    body = {
        "model": "glm-tiny",
        "max_tokens": 9,
        "messages": [{"role": "user", "content": "Hi"}],
        "tools": [{"name": "book", "input_schema": SCHEMA["function"]["parameters"]}],
    }
    validate = validator(RawMessageStreamEvent)
    wire = rendered(anthropic, anthropic.parse(body, SERVED), events, failure)
    checked = [validate(e) for e in wire if e["type"] not in ("ping", "error")]
    assert [e["type"] for e in wire if e["type"] in ("ping", "error")] == ["ping"] + (
        ["error"] if failure else []
    )
    if not failure:
        assert (
            checked[-2].delta.stop_reason == "tool_use"
            and checked[-2].usage.cache_read_input_tokens == 4
        )


def test_whole_replies_validate_as_the_sdks_types():
    from anthropic.types import Message
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.responses import Response

    from mlx_glm4v.server.neutral import Finish, Meta

    def Usage():  # the engine's own, as a finished reply carries it
        return EngineUsage(prompt_tokens=9, completion_tokens=7, cached_tokens=4)

    parser = ReplyParser([SCHEMA])
    events = (
        parser.feed(
            "<think>Plan.</think>Sure.<tool_call>book<arg_key>days</arg_key><arg_value>2</arg_value>"
            "</tool_call>"
        )
        + parser.finish()
        + [Finish("tool_calls", Usage(), reasoning_tokens=3)]
    )
    meta = Meta("x_1", 0, "glm-tiny", 9, SERVED)
    tools = [{"type": "function", "name": "book", "parameters": SCHEMA["function"]["parameters"]}]
    response = Response.model_validate(
        responses.whole(
            responses.parse({"model": "glm-tiny", "input": "Hi", "tools": tools}, SERVED),
            events,
            meta,
        )
    )
    assert response.output[-1].arguments == '{"days": 2}' and response.output_text == "Sure."
    body = {
        "model": "glm-tiny",
        "max_tokens": 9,
        "messages": [{"role": "user", "content": "Hi"}],
        "tools": [{"name": "book", "input_schema": SCHEMA["function"]["parameters"]}],
    }
    message = Message.model_validate(anthropic.whole(anthropic.parse(body, SERVED), events, meta))
    assert [b.type for b in message.content] == [
        "thinking",
        "text",
        "tool_use",
    ] and message.stop_reason == "tool_use"
    chat = openai.parse(
        {
            "model": "glm-tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [SCHEMA],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        SERVED,
    )
    completion = ChatCompletion.model_validate(openai.whole(chat, events, meta))
    assert completion.choices[0].message.tool_calls[0].function.arguments == '{"days": 2}'
    stream = openai.Stream(chat, meta)
    chunks = [
        ChatCompletionChunk.model_validate(json.loads(line[6:]))
        for line in stream.head() + stream.feed(events)
        if line.startswith("data: ")
    ]
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 4
