"""`POST /v1/responses` as the official `openai` package reads it, on real server processes.

`plain`: the tiny GLM-4.1V (greedy parity with /v1/chat/completions, text and images);
`scripted`: a GLM-4.5V-family checkpoint whose template has tools, rewired to reply with a tool
call (tiny.scripted_checkpoint), behind an API key.
"""

import base64
import json

import httpx
import pytest
import tiny
from servers import FOX, SCRIPTED_KEY, THOUGHT, TOOL_SCRIPT, Server, chat_twin, images, special_text

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def plain(glm4v_checkpoint, tmp_path_factory):
    # prompts may pass the tiny model's context of 4096 tokens, and then need a token limit
    server = Server(
        glm4v_checkpoint[0],
        ["--keepalive", "0.05", "--max-prompt-tokens", "8192"],
        tmp_path_factory.mktemp("responses") / "plain.log",
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def scripted(glm4v_moe_checkpoint, tmp_path_factory):
    path = tiny.scripted_checkpoint(
        glm4v_moe_checkpoint[0], tmp_path_factory.mktemp("fox-script"), TOOL_SCRIPT
    )
    server = Server(
        path,
        ["--api-key", SCRIPTED_KEY],
        tmp_path_factory.mktemp("responses") / "scripted.log",
        key=SCRIPTED_KEY,
    )
    server.checkpoint = path
    yield server
    server.close()


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
    parts = [{"type": "input_image", "image_url": u, "detail": "original"} for u in urls] + [
        {"type": "input_text", "text": text}
    ]
    items = [{"role": "user", "content": parts}] if count else text
    whole = plain.client.responses.create(
        model=plain.model, input=items, temperature=0, max_output_tokens=12
    )
    message = chat.choices[0].message
    assert whole.output_text == message.content
    reasoning = [i for i in whole.output if i.type == "reasoning"]
    assert "".join(c.text for i in reasoning for c in i.content or []) == (
        getattr(message, "reasoning_content", None) or ""
    )
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (
        chat.usage.prompt_tokens,
        chat.usage.completion_tokens,
    )
    assert whole.usage.input_tokens_details.cached_tokens >= 0
    assert whole.status == (
        "incomplete" if chat.choices[0].finish_reason == "length" else "completed"
    )

    events = list(
        plain.client.responses.create(
            model=plain.model, input=items, temperature=0, max_output_tokens=12, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == f"response.{whole.status}"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert (
        "".join(e.delta for e in events if e.type == "response.output_text.delta")
        == whole.output_text
    )
    final = events[-1].response
    assert final.output_text == whole.output_text
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        whole.usage.input_tokens,
        whole.usage.output_tokens,
    )
    # the same prompt again is read from the prefix cache, all of it but its last token
    assert final.usage.input_tokens_details.cached_tokens == final.usage.input_tokens - 1
    for added, done in zip(
        [e for e in events if e.type == "response.output_item.added"],
        [e for e in events if e.type == "response.output_item.done"],
    ):
        assert added.output_index == done.output_index and added.item.id == done.item.id


def test_store_retrieve_chain_and_delete(plain):
    first = plain.client.responses.create(
        model=plain.model,
        input="Hello!",
        temperature=0,
        max_output_tokens=6,
        instructions="Be brief.",
    )
    got = plain.client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text
    second = plain.client.responses.create(
        model=plain.model,
        input="And then?",
        previous_response_id=first.id,
        temperature=0,
        max_output_tokens=6,
    )
    assert second.previous_response_id == first.id
    # the chain is the whole conversation (but the first turn's instructions, as OpenAI does)
    history = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": [{"type": "output_text", "text": first.output_text}]},
        {"role": "user", "content": "And then?"},
    ]
    spelled = plain.client.responses.create(
        model=plain.model, input=history, temperature=0, max_output_tokens=6
    )
    assert spelled.usage.input_tokens == second.usage.input_tokens
    assert spelled.output_text == second.output_text
    # second's prompt
    assert spelled.usage.input_tokens_details.cached_tokens == spelled.usage.input_tokens - 1
    unstored = plain.client.responses.create(
        model=plain.model, input="Hi", store=False, max_output_tokens=2
    )
    with pytest.raises(openai.NotFoundError):
        plain.client.responses.retrieve(unstored.id)
    deleted = httpx.delete(f"{plain.url}/v1/responses/{first.id}", timeout=10)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        plain.client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        plain.client.responses.create(
            model=plain.model, input="x", previous_response_id=first.id, max_output_tokens=2
        )


def test_codex_request_shape_is_accepted(plain):
    """What Codex CLI sends (issue 18): developer message, hosted tool, include, store false,
    extras."""
    body = {
        "model": plain.model,
        "instructions": "You are a coding agent.",
        "input": [
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text", "text": "Rules."}],
            },
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        ],
        "tools": [{"type": "web_search"}],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"summary": "auto", "effort": "medium"},
        "include": ["reasoning.encrypted_content"],
        "store": False,
        "prompt_cache_key": "abc",
        "client_metadata": {"x": "y"},
        "stream": True,
        "text": {"verbosity": "low"},
        "max_output_tokens": 4,
    }
    with httpx.stream("POST", f"{plain.url}/v1/responses", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    last = json.loads(lines[-1][6:])
    assert last["type"] in ("response.completed", "response.incomplete")
    assert last["response"]["store"] is False


def refused(server, body, status, words, key=None):
    headers = {"Authorization": f"Bearer {key or server.key}"} if (key or server.key) else {}
    response = httpx.post(f"{server.url}/v1/responses", json=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["message"].endswith("."), error
    assert "Traceback" not in response.text
    ok = {"model": server.model, "input": "Hi", "max_output_tokens": 1}
    headers = {"x-api-key": server.key} if server.key else {}
    assert (
        httpx.post(f"{server.url}/v1/responses", json=ok, headers=headers, timeout=30).status_code
        == 200
    )
    return error


def test_refusals_in_openai_shape(plain, scripted):
    m = plain.model
    refused(plain, {"model": m, "input": "Hi", "bogus": 1}, 400, "'bogus'")
    refused(plain, {"model": "gpt-5", "input": "Hi"}, 404, "does not exist")
    refused(
        plain, {"model": m, "input": "Hi", "text": {"format": {"type": "xml"}}}, 400, "text.format"
    )
    refused(
        plain, {"model": m, "input": [{"type": "item_reference", "id": "x"}]}, 400, "item_reference"
    )
    refused(
        plain,
        {"model": m, "input": "Hi", "include": ["message.output_text.logprobs"]},
        400,
        "include",
    )
    refused(
        plain, {"model": m, "input": "Hi", "reasoning": {"effort": "huge"}}, 400, "reasoning.effort"
    )
    # over the context: without max_output_tokens no reply fits (it was cut at one token)
    long = "a " * 5000
    assert (
        refused(plain, {"model": m, "input": long}, 400, "fills the model's context")["code"]
        == "context_length_exceeded"
    )
    s = scripted
    refused(
        s,
        {
            "model": s.model,
            "input": "Hi",
            "tools": [FOX],
            "tool_choice": {"type": "function", "name": "nope"},
        },
        400,
        "tool_choice",
    )
    refused(s, {"model": s.model, "input": "Hi"}, 401, "API key", key="wrong")
    assert refused(
        s, {"model": s.model, "input": "Hi", "max_output_tokens": 0}, 400, "max_output_tokens"
    )["param"]


def test_tool_call_streams_as_fragments(scripted):
    client = scripted.client
    whole = client.responses.create(
        model=scripted.model, input="Where?", tools=[FOX], temperature=0
    )
    calls = [i for i in whole.output if i.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("fox", {"city": 'Pa"r\\is'})]
    assert [i.type for i in whole.output] == ["reasoning", "message", "function_call"]
    assert whole.output_text == "OK"
    events = list(
        client.responses.create(
            model=scripted.model, input="Where?", tools=[FOX], temperature=0, stream=True
        )
    )
    fragments = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(fragments) > 2 and "".join(fragments) == calls[0].arguments
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [d.arguments for d in done] == [calls[0].arguments]
    with client.responses.stream(
        model=scripted.model, input="Where?", tools=[FOX], temperature=0
    ) as stream:
        final = stream.get_final_response()
    rebuilt = [i for i in final.output if i.type == "function_call"]
    assert [(c.name, c.arguments) for c in rebuilt] == [(c.name, c.arguments) for c in calls]


def test_agent_turns_read_the_prefix_cache_and_reasoning_comes_back(scripted):
    """Turn 2 resends turn 1 with the call's output (store false, sealed reasoning, as Codex
    does)."""
    client = scripted.client
    first_input = [
        {"role": "developer", "content": "You are an agent."},
        {"role": "user", "content": "Where?"},
    ]
    first = client.responses.create(
        model=scripted.model,
        input=first_input,
        tools=[FOX],
        temperature=0,
        store=False,
        include=["reasoning.encrypted_content"],
    )
    reasoning = next(i for i in first.output if i.type == "reasoning")
    blob = reasoning.encrypted_content
    # sealed, not encoded
    assert blob and THOUGHT not in blob and THOUGHT.encode() not in base64.b64decode(blob)
    call = next(i for i in first.output if i.type == "function_call")
    turn = [
        reasoning.model_dump(exclude_none=True),
        *[i.model_dump(exclude_none=True) for i in first.output[1:]],
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"},
    ]
    second = client.responses.create(
        model=scripted.model, input=first_input + turn, tools=[FOX], temperature=0, store=False
    )
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1
    assert second.usage.input_tokens > first.usage.input_tokens
    # the sealed thinking is restored where GLM-4.5V's template places it: a forged one is dropped
    forged = [{**turn[0], "encrypted_content": "AAAA" + reasoning.encrypted_content[4:]}] + turn[1:]
    third = client.responses.create(
        model=scripted.model,
        input=first_input + forged,
        tools=[FOX],
        temperature=0,
        store=False,
        max_output_tokens=1,
    )
    plain_text = [
        {
            **turn[0],
            "encrypted_content": None,
            "content": [{"type": "reasoning_text", "text": THOUGHT}],
        }
    ]
    fourth = client.responses.create(
        model=scripted.model,
        input=first_input + plain_text + turn[1:],
        tools=[FOX],
        temperature=0,
        store=False,
        max_output_tokens=1,
    )
    assert fourth.usage.input_tokens == second.usage.input_tokens > third.usage.input_tokens


def test_chat_completions_tool_call_streams_as_fragments(scripted):
    """Chat completions too: the call's id and name first, then argument fragments the SDK adds
    up."""
    tool = {"type": "function", "function": {k: v for k, v in FOX.items() if k != "type"}}
    options = dict(
        model=scripted.model,
        messages=[{"role": "user", "content": "Where?"}],
        tools=[tool],
        temperature=0,
    )
    whole = scripted.client.chat.completions.create(**options)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and message.content == "OK"
    [call] = message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "fox",
        {"city": 'Pa"r\\is'},
    )
    chunks = list(scripted.client.chat.completions.create(**options, stream=True))
    deltas = [
        t
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
        for t in c.choices[0].delta.tool_calls
    ]
    assert deltas[0].id and deltas[0].function.name == "fox" and deltas[0].function.arguments == ""
    assert all(d.id is None and d.index == 0 for d in deltas[1:]) and len(deltas) > 3
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments
    with scripted.client.chat.completions.stream(**options) as stream:
        final = stream.get_final_completion()
    [rebuilt] = final.choices[0].message.tool_calls
    assert (rebuilt.function.name, rebuilt.function.arguments) == (
        call.function.name,
        call.function.arguments,
    )


def test_effort_none_is_the_template_switch(scripted):
    """GLM-4.5V's template has the switch: effort none renders enable_thinking=false, as chat's
    kwargs do."""
    chat = scripted.client.chat.completions.create(
        model=scripted.model,
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=1,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    out = scripted.client.responses.create(
        model=scripted.model, input="Hi", max_output_tokens=1, reasoning={"effort": "none"}
    )
    default = scripted.client.responses.create(
        model=scripted.model, input="Hi", max_output_tokens=1
    )
    assert out.usage.input_tokens == chat.usage.prompt_tokens > default.usage.input_tokens


def test_special_tokens_in_messages_are_text(scripted):
    text, assistant = special_text(scripted)
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": f"Hi {text}"}]},
        {
            "type": "reasoning",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": f"Think {text}"}],
        },
        {"role": "assistant", "content": [{"type": "output_text", "text": f"Calling {assistant}"}]},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "fox",
            "arguments": json.dumps({"city": text}),
        },
        {"type": "function_call_output", "call_id": "call_1", "output": f"Found {text}"},
    ]
    out = scripted.client.responses.create(
        model=scripted.model,
        instructions=f"Rules {text}",
        input=items,
        tools=[{**FOX, "description": f"Look {text}"}],
        max_output_tokens=1,
    )
    assert out.usage.input_tokens == chat_twin(scripted, text, assistant)
