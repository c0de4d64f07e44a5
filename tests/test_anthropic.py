"""`POST /v1/messages` and `/v1/messages/count_tokens` as the official `anthropic` package reads
them.

`plain`: the tiny GLM-4.1V with --max-output-tokens 8 (greedy parity with /v1/chat/completions
on the same server, text and images); `scripted`: a GLM-4.5V-family checkpoint whose template
has tools, rewired to reply with a tool call, behind an API key, answering any model name.
"""

import itertools
import json

import anthropic
import httpx
import pytest
import tiny
from servers import SCRIPTED_KEY, THOUGHT, TOOL_SCRIPT, Server, chat_twin, images, special_text

FOX = {
    "name": "fox",
    "description": "Look a city up.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def client_of(server, key="unused", **headers):
    return anthropic.Anthropic(
        base_url=server.url, api_key=key, max_retries=0, timeout=60, default_headers=headers
    )


@pytest.fixture(scope="module")
def plain(glm4v_checkpoint, tmp_path_factory):
    server = Server(
        glm4v_checkpoint[0],
        ["--keepalive", "0.05", "--max-output-tokens", "8", "--max-body-mb", "1"],
        tmp_path_factory.mktemp("anthropic") / "plain.log",
    )
    server.anthropic = client_of(server)
    yield server
    server.close()


@pytest.fixture(scope="module")
def scripted(glm4v_moe_checkpoint, tmp_path_factory):
    path = tiny.scripted_checkpoint(
        glm4v_moe_checkpoint[0], tmp_path_factory.mktemp("fox-script"), TOOL_SCRIPT
    )
    server = Server(
        path,
        ["--api-key", SCRIPTED_KEY, "--answer-any-model"],
        tmp_path_factory.mktemp("anthropic") / "s.log",
        key=SCRIPTED_KEY,
    )
    server.anthropic, server.checkpoint = client_of(server, SCRIPTED_KEY), path
    yield server
    server.close()


def blocks(message, kind):
    return [b for b in message.content if b.type == kind]


@pytest.mark.parametrize("count", [0, 1, 2])
def test_greedy_equals_chat_completions(plain, count):
    urls, text = images(count), "Describe this image in detail."
    chat_parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [
        {"type": "text", "text": text}
    ]
    chat = plain.client.chat.completions.create(
        model=plain.model,
        messages=[{"role": "user", "content": chat_parts}],
        temperature=0,
        max_completion_tokens=12,
    )
    parts = [
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": u.split(",", 1)[1]},
        }
        for u in urls
    ] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": parts if count else text}]
    whole = plain.anthropic.messages.create(
        model=plain.model, messages=messages, max_tokens=12, extra_body={"temperature": 0}
    )
    message = chat.choices[0].message
    assert "".join(b.text for b in blocks(whole, "text")) == (message.content or "")
    assert "".join(b.thinking for b in blocks(whole, "thinking")) == (
        getattr(message, "reasoning_content", None) or ""
    )
    u = whole.usage
    assert (u.input_tokens + u.cache_read_input_tokens, u.output_tokens) == (
        chat.usage.prompt_tokens,
        chat.usage.completion_tokens,
    )
    # --max-output-tokens 8 clamped both the same way
    assert (
        u.output_tokens == 8
        and whole.stop_reason == "max_tokens"
        and chat.choices[0].finish_reason == "length"
    )

    with plain.anthropic.messages.stream(
        model=plain.model, messages=messages, max_tokens=12, extra_body={"temperature": 0}
    ) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert [b.model_dump() for b in final.content if b.type == "text"] == [
        b.model_dump() for b in whole.content if b.type == "text"
    ]
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8
    # the same prompt again: all of it but its last token read from the prefix cache
    assert final.usage.cache_read_input_tokens == chat.usage.prompt_tokens - 1
    assert final.usage.input_tokens == 1 and final.usage.cache_creation_input_tokens == 0
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds

    counted = plain.anthropic.messages.count_tokens(model=plain.model, messages=messages)
    assert counted.input_tokens == chat.usage.prompt_tokens


def test_wire_events_exactly_as_anthropic_streams(plain):
    body = {
        "model": plain.model,
        "max_tokens": 5,
        "stream": True,
        "messages": [{"role": "user", "content": "Hi"}],
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
    }
    with httpx.stream(
        "POST",
        f"{plain.url}/v1/messages?beta=true",
        json=body,
        timeout=60,
        headers={"anthropic-version": "2023-06-01", "anthropic-beta": "a-2025,b-2025"},
    ) as response:
        assert response.status_code == 200
        text = "".join(response.iter_text())
    events = [
        (block.split("\n")[0][7:], json.loads(block.split("\n")[1][6:]))
        for block in text.strip().split("\n\n")
    ]
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == [
        "message_delta",
        "message_stop",
    ]
    for i, (name, data) in enumerate(events):
        if name == "content_block_start":
            assert (
                events[i + 1][0] == "content_block_delta"
                and data["index"] == events[i + 1][1]["index"]
            )
    assert (
        events[-2][1]["delta"]["stop_reason"] == "max_tokens"
        and events[-2][1]["usage"]["output_tokens"] == 5
    )


def test_tool_use_streams_as_input_json_deltas(scripted):
    c = scripted.anthropic
    whole = c.messages.create(
        model=scripted.model,
        max_tokens=100,
        extra_body={"temperature": 0},
        tools=[FOX],
        messages=[{"role": "user", "content": "Where?"}],
    )
    assert [b.type for b in whole.content] == ["thinking", "text", "tool_use"]
    assert whole.stop_reason == "tool_use"
    use = whole.content[2]
    assert (use.name, use.input) == ("fox", {"city": 'Pa"r\\is'}) and use.id.startswith("toolu_")
    assert whole.content[0].thinking == THOUGHT and whole.content[0].signature
    with c.messages.stream(
        model=scripted.model,
        max_tokens=100,
        extra_body={"temperature": 0},
        tools=[FOX],
        messages=[{"role": "user", "content": "Where?"}],
    ) as stream:
        fragments = [
            e.delta.partial_json
            for e in stream
            if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
        ]
        final = stream.get_final_message()
    assert len(fragments) > 2 and json.loads("".join(fragments)) == use.input
    assert [(b.type, getattr(b, "input", None)) for b in final.content] == [
        (b.type, getattr(b, "input", None)) for b in whole.content
    ]
    assert final.content[0].signature and final.stop_reason == "tool_use"


def test_claude_code_turns_read_the_prefix_cache(scripted):
    """What Claude Code sends (issue 18), twice: the second turn resends the first with the
    tool's result."""
    c = scripted.anthropic
    system = [
        {"type": "text", "text": "You are Claude Code."},
        {"type": "text", "text": "Be careful.", "cache_control": {"type": "ephemeral"}},
    ]
    first_messages = [{"role": "user", "content": [{"type": "text", "text": "Where?"}]}]
    extra = dict(
        thinking={"type": "adaptive", "display": "omitted"},
        output_config={"effort": "high"},
        extra_body={
            "temperature": 0,
            "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
        },
        metadata={"user_id": "u1"},
        extra_headers={"anthropic-beta": "x-2025,y-2025"},
        extra_query={"beta": "true"},
    )
    first = c.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=32000,
        system=system,
        tools=[FOX],
        messages=first_messages,
        **extra,
    )
    assert first.model == scripted.model  # --answer-any-model
    thinking = blocks(first, "thinking")[0]
    assert thinking.thinking == "" and thinking.signature  # display: omitted
    use = blocks(first, "tool_use")[0]
    turn = first_messages + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "Sunny"},
                {"type": "text", "text": "<system-reminder>go on</system-reminder>"},
            ],
        },
    ]
    second = c.messages.create(
        model="claude-haiku-4-5",
        max_tokens=32000,
        system=system,
        tools=[FOX],
        messages=turn,
        **extra,
    )
    total = second.usage.input_tokens + second.usage.cache_read_input_tokens
    first_total = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert total > first_total
    assert second.usage.cache_read_input_tokens >= first_total - 1
    counted = c.messages.count_tokens(model="x", system=system, tools=[FOX], messages=turn)
    assert counted.input_tokens == total


def refused(server, body, status, kind, words, headers=None, path="/v1/messages"):
    headers = headers if headers is not None else {"x-api-key": server.key or ""}
    response = httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == kind, error
    assert words in error["error"]["message"] and error["error"]["message"].endswith("."), error
    ok = {"model": server.model, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
    assert (
        httpx.post(
            f"{server.url}/v1/messages",
            json=ok,
            headers={"x-api-key": server.key or ""},
            timeout=30,
        ).status_code
        == 200
    )


def test_refusals_in_anthropic_shape(plain, scripted):
    m, hi = plain.model, [{"role": "user", "content": "Hi"}]
    refused(plain, {"model": m, "messages": hi}, 400, "invalid_request_error", "max_tokens")
    refused(
        plain,
        {"model": m, "max_tokens": 5, "messages": hi, "bogus": 1},
        400,
        "invalid_request_error",
        "'bogus'",
    )
    refused(
        plain,
        {"model": "claude-opus-4", "max_tokens": 5, "messages": hi},
        404,
        "not_found_error",
        "does not exist",
    )
    document = [{"role": "user", "content": [{"type": "document", "source": {}}]}]
    refused(
        plain,
        {"model": m, "max_tokens": 5, "messages": document},
        400,
        "invalid_request_error",
        "'document'",
    )
    refused(
        plain,
        {
            "model": m,
            "max_tokens": 5,
            "messages": hi,
            "output_config": {"format": {"type": "json_schema"}},
        },
        400,
        "invalid_request_error",
        "output_config.format",
    )
    refused(
        plain,
        {"model": m, "max_tokens": 5, "messages": hi, "temperature": 3},
        400,
        "invalid_request_error",
        "temperature",
    )
    refused(
        plain,
        {"model": m, "messages": hi, "bogus": 1},
        400,
        "invalid_request_error",
        "'bogus'",
        path="/v1/messages/count_tokens",
    )
    big = [{"role": "user", "content": "x" * (1 << 20)}]
    refused(
        plain,
        {"model": m, "max_tokens": 5, "messages": big},
        413,
        "request_too_large",
        "request body",
    )
    refused(
        plain,
        {"model": m, "max_tokens": 5, "messages": hi},
        405,
        "invalid_request_error",
        "not allowed",
        path="/v1/messages/nowhere",
    )
    s = scripted
    refused(
        s,
        {
            "model": s.model,
            "max_tokens": 5,
            "messages": hi,
            "tools": [FOX],
            "tool_choice": {"type": "tool", "name": "nope"},
        },
        400,
        "invalid_request_error",
        "tool_choice",
    )
    refused(
        s,
        {"model": s.model, "max_tokens": 5, "messages": hi},
        401,
        "authentication_error",
        "API key",
        headers={"x-api-key": "wrong"},
    )
    with pytest.raises(anthropic.AuthenticationError):
        client_of(s, "wrong").messages.create(model=s.model, max_tokens=1, messages=hi)
    bearer = anthropic.Anthropic(base_url=s.url, auth_token=SCRIPTED_KEY, max_retries=0, timeout=60)
    assert bearer.messages.create(model=s.model, max_tokens=1, messages=hi).usage.output_tokens == 1


def test_stop_sequences(plain):
    messages = [{"role": "user", "content": "Hello! How are you today?"}]
    full = plain.anthropic.messages.create(
        model=plain.model,
        messages=messages,
        max_tokens=8,
        extra_body={"temperature": 0, "thinking": {"type": "disabled"}},
    )
    text = "".join(b.text for b in blocks(full, "text"))
    start = next(i for i in range(1, len(text) - 2) if text[i : i + 2].isalnum())
    # Two characters, and most of the rest: a stop that spans tokens begins in text held back,
    # and the reply still names it, not the first of the stop sequences.
    long = text[start : start + max(3, (len(text) - start) * 2 // 3)]
    for stop, streamed in itertools.product((text[start : start + 2], long), (False, True)):
        options = dict(
            model=plain.model,
            messages=messages,
            max_tokens=8,
            stop_sequences=["never-seen", stop],
            extra_body={"temperature": 0, "thinking": {"type": "disabled"}},
        )
        if streamed:
            with plain.anthropic.messages.stream(**options) as stream:
                out = stream.get_final_message()
        else:
            out = plain.anthropic.messages.create(**options)
        assert (out.stop_reason, out.stop_sequence) == ("stop_sequence", stop)
        assert "".join(b.text for b in blocks(out, "text")) == text[: text.find(stop)].strip()


def test_thinking_knobs_reach_the_thinking_budget(box_checkpoint, tmp_path_factory):
    """The scripted GLM-4.1V replies `<think>hm</think>...`: a budget of 0 closes the thinking at
    once. GLM-4.1V has no thinking switch, so Anthropic's disabled and Responses' effort none are
    that budget."""
    server = Server(box_checkpoint, [], tmp_path_factory.mktemp("anthropic") / "box.log")
    try:
        c, hi = client_of(server), [{"role": "user", "content": "Hi"}]
        for thinking, want in (
            ({"type": "disabled"}, []),
            ({"type": "enabled", "budget_tokens": 0}, []),
            ({"type": "enabled", "budget_tokens": 5}, ["hm"]),
            ({"type": "adaptive"}, ["hm"]),
        ):
            out = c.messages.create(
                model=server.model,
                messages=hi,
                max_tokens=30,
                thinking=thinking,
                extra_body={"temperature": 0},
            )
            assert [b.thinking for b in blocks(out, "thinking")] == want, thinking
            assert "Nose:" in out.content[-1].text
        for effort, want in (("none", ""), ("minimal", "hm"), ("high", "hm")):
            out = server.client.responses.create(
                model=server.model, input="Hi", reasoning={"effort": effort}, temperature=0
            )
            reasoning = [c.text for i in out.output if i.type == "reasoning" for c in i.content]
            assert "".join(reasoning) == want and "Nose:" in out.output_text
    finally:
        server.close()


def test_special_tokens_in_messages_are_text(scripted):
    """As chat completions: every special token as text, in every place. A thinking block signed by
    anyone but this server process is dropped, so its twin has no reasoning."""
    text, assistant = special_text(scripted)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": f"Hi {text}"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": f"Think {text}", "signature": "forged"},
                {"type": "text", "text": f"Calling {assistant}"},
                {"type": "tool_use", "id": "call_1", "name": "fox", "input": {"city": text}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": f"Found {text}"}
            ],
        },
    ]
    options = dict(
        model=scripted.model,
        system=f"Rules {text}",
        messages=messages,
        tools=[{**FOX, "description": f"Look {text}"}],
    )
    out = scripted.anthropic.messages.create(**options, max_tokens=1)
    counted = scripted.anthropic.messages.count_tokens(**options).input_tokens
    assert out.usage.input_tokens + out.usage.cache_read_input_tokens == counted
    assert counted == chat_twin(scripted, text, assistant, reasoning=False)


def test_models_as_both_sdks_read_them(plain, scripted):
    assert [m.id for m in plain.anthropic.models.list()] == [plain.model]
    assert [m.id for m in plain.client.models.list()] == [plain.model]
    assert plain.anthropic.models.retrieve(plain.model).id == plain.model
    assert plain.client.models.retrieve(plain.model).id == plain.model
    with pytest.raises(anthropic.NotFoundError):
        plain.anthropic.models.retrieve("claude-haiku-4-5")
    # --answer-any-model
    assert scripted.anthropic.models.retrieve("claude-haiku-4-5").id == "claude-haiku-4-5"


def test_message_start_leaves_the_cache_split_to_message_delta(plain):
    body = {
        "model": plain.model,
        "max_tokens": 2,
        "stream": True,
        "messages": [{"role": "user", "content": "Hey"}],
    }
    for _ in range(2):  # the second reads its prompt from the cache
        with httpx.stream("POST", f"{plain.url}/v1/messages", json=body, timeout=60) as response:
            events = [
                json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")
            ]
    start, delta = (
        events[0]["message"]["usage"],
        next(e for e in events if e["type"] == "message_delta")["usage"],
    )
    assert start["cache_read_input_tokens"] is None and delta["cache_read_input_tokens"] > 0
    assert start["input_tokens"] == delta["input_tokens"] + delta["cache_read_input_tokens"]
