"""Ollama's API as the official `ollama` package reads it, against a real server.

`plain`: the tiny random GLM-4.5V (its template has tools and thinking): greedy replies equal the
chat-completions path's for the same request (text, an image, generate's system and prompt),
streamed and whole; JSON and a JSON schema through the constraint; the model's descriptions;
refusals in Ollama's form. `scripted`: the same checkpoint rewired to think and call a tool.
"""

import json

import httpx
import jsonschema
import pytest
import tiny
from helpers import data_url, picture, png_bytes
from schemas import SCHEMAS
from servers import THOUGHT, TOOL_SCRIPT, Server

ollama = pytest.importorskip("ollama")

FOX = {
    "type": "function",
    "function": {
        "name": "fox",
        "description": "Look a city up.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def plain(glm4v_moe_checkpoint, tmp_path_factory):
    server = Server(
        glm4v_moe_checkpoint[0],
        ["--keepalive", "0.05"],
        tmp_path_factory.mktemp("ollama") / "p.log",
    )
    server.ollama = ollama.Client(host=server.url, timeout=60)
    yield server
    server.close()


@pytest.fixture(scope="module")
def scripted(glm4v_moe_checkpoint, tmp_path_factory):
    path = tiny.scripted_checkpoint(
        glm4v_moe_checkpoint[0], tmp_path_factory.mktemp("fox-script"), TOOL_SCRIPT
    )
    server = Server(path, [], tmp_path_factory.mktemp("ollama") / "s.log")
    server.ollama = ollama.Client(host=server.url, timeout=60)
    yield server
    server.close()


def chat_completion(server, messages, max_tokens=12, **extra):
    return server.client.chat.completions.create(
        model=server.model,
        messages=messages,
        max_completion_tokens=max_tokens,
        **{"temperature": 0, **extra},
    )


def joined(chunks) -> tuple:
    """(content, thinking, the last chunk) of a streamed chat."""
    chunks = list(chunks)
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    content = "".join(c.message.content or "" for c in chunks)
    thinking = "".join(c.message.thinking or "" for c in chunks)
    return content, thinking, chunks[-1]


def assert_final(reply, completion):
    """The last line's counts and durations (nanoseconds) as Ollama gives them."""
    assert reply.done is True
    assert reply.done_reason == completion.choices[0].finish_reason
    assert reply.prompt_eval_count == completion.usage.prompt_tokens
    assert reply.eval_count == completion.usage.completion_tokens
    for name in ("total_duration", "prompt_eval_duration", "eval_duration", "load_duration"):
        assert isinstance(getattr(reply, name), int), name
    assert reply.total_duration > reply.prompt_eval_duration > 0
    assert reply.total_duration < 60e9


@pytest.mark.parametrize("count", [0, 1])
def test_chat_equals_chat_completions(plain, count):
    pictures = [png_bytes(picture(112 + 28 * i, 140, 50 + i)) for i in range(count)]
    text = "Describe this image in detail."
    parts = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in pictures]
    completion = chat_completion(
        plain, [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]
    )
    message = {"role": "user", "content": text, "images": pictures}
    whole = plain.ollama.chat(plain.model, [message], options=GREEDY)
    expected = completion.choices[0].message
    assert whole.message.role == "assistant"
    assert whole.message.content == expected.content
    assert (whole.message.thinking or None) == getattr(expected, "reasoning_content", None)
    assert_final(whole, completion)
    content, thinking, last = joined(
        plain.ollama.chat(plain.model, [message], options=GREEDY, stream=True)
    )
    assert (content, thinking) == (whole.message.content, whole.message.thinking or "")
    assert_final(last, completion)


def test_generate_equals_chat_completions(plain):
    completion = chat_completion(
        plain, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    )
    whole = plain.ollama.generate(plain.model, "Hi there", system="Be brief.", options=GREEDY)
    assert whole.response == completion.choices[0].message.content
    assert_final(whole, completion)
    chunks = list(
        plain.ollama.generate(
            plain.model, "Hi there", system="Be brief.", options=GREEDY, stream=True
        )
    )
    assert "".join(c.response for c in chunks) == whole.response
    assert "".join(c.thinking or "" for c in chunks) == (whole.thinking or "")
    assert_final(chunks[-1], completion)


def test_options_reach_the_sampler(plain):
    """Sampling options take effect: the same seed gives the same reply, a stop string ends it."""
    options = {
        "temperature": 1.0,
        "top_k": 20,
        "top_p": 0.9,
        "min_p": 0.01,
        "seed": 7,
        "num_predict": 16,
    }
    message = [{"role": "user", "content": "Tell me more"}]
    a, b = (plain.ollama.chat(plain.model, message, options=options) for _ in range(2))
    assert a.message.content == b.message.content and a.eval_count == 16
    completion = chat_completion(
        plain,
        message,
        16,
        seed=7,
        temperature=1.0,
        top_p=0.9,
        extra_body={"top_k": 20, "min_p": 0.01},
    )
    assert a.message.content == completion.choices[0].message.content
    text = plain.ollama.chat(plain.model, message, options=GREEDY).message.content
    if len(text) > 2:
        stopped = plain.ollama.chat(plain.model, message, options={**GREEDY, "stop": [text[1:3]]})
        assert stopped.message.content == text[: text.index(text[1:3])]
        assert stopped.done_reason == "stop"
    small = plain.ollama.chat(
        plain.model, message, options={**GREEDY, "num_ctx": a.prompt_eval_count + 3}
    )
    assert small.eval_count == 3 and small.done_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_and_json(plain, stream):
    schema = SCHEMAS[53]
    for fmt in (schema, "json"):
        reply = plain.ollama.chat(
            plain.model,
            [{"role": "user", "content": "A receipt, please."}],
            format=fmt,
            think=False,
            options={"temperature": 0, "num_predict": 160},
            stream=stream,
        )
        content = joined(reply)[0] if stream else reply.message.content
        value = json.loads(content)
        assert isinstance(value, dict)
        if fmt is schema:
            jsonschema.validate(value, schema)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_and_thinking(scripted, stream):
    reply = scripted.ollama.chat(
        scripted.model,
        [{"role": "user", "content": "Where is Paris?"}],
        tools=[FOX],
        stream=stream,
        options={"num_predict": 64},
    )
    if stream:
        chunks = list(reply)
        calls = [c for chunk in chunks for c in chunk.message.tool_calls or []]
        content, thinking, last = joined(chunks)
    else:
        calls, content, thinking, last = (
            reply.message.tool_calls,
            reply.message.content,
            reply.message.thinking,
            reply,
        )
    assert (thinking, content) == (THOUGHT, "OK")
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        ("fox", {"city": 'Pa"r\\is'})
    ]
    assert last.done_reason == "stop"
    # the call and its result go back in Ollama's form and render
    follow = scripted.ollama.chat(
        scripted.model,
        [
            {"role": "user", "content": "Where is Paris?"},
            {"role": "assistant", "content": "OK", "thinking": THOUGHT, "tool_calls": calls},
            {"role": "tool", "content": "In France", "tool_name": "fox"},
        ],
        tools=[FOX],
        options={"num_predict": 4},
    )
    assert follow.done is True and follow.prompt_eval_count > last.prompt_eval_count


def test_think_false_is_the_templates_switch(plain):
    """think: false renders the prompt as chat completions' enable_thinking: false does."""
    message = [{"role": "user", "content": "Hi"}]
    completion = chat_completion(
        plain, message, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    reply = plain.ollama.chat(plain.model, message, think=False, options=GREEDY)
    assert reply.message.content == completion.choices[0].message.content
    assert_final(reply, completion)
    assert (
        reply.prompt_eval_count
        != plain.ollama.chat(plain.model, message, options=GREEDY).prompt_eval_count
    )


def test_tags_show_ps_version(plain):
    tags = plain.ollama.list()
    assert [m.model for m in tags.models] == [plain.model]
    assert tags.models[0].size > 0 and len(tags.models[0].digest) == 64
    assert tags.models[0].details.family == "glm4v_moe"
    show = plain.ollama.show(plain.model)
    assert {"completion", "vision", "tools", "thinking"} <= set(show.capabilities)
    assert show.modelinfo["general.architecture"] == "glm4v_moe"
    assert show.modelinfo["general.parameter_count"] > 0
    assert show.modelinfo["glm4v_moe.context_length"] > 0
    assert show.details.parameter_size and show.template
    ps = plain.ollama.ps()
    assert [m.model for m in ps.models] == [plain.model]
    assert ps.models[0].size_vram == ps.models[0].size == tags.models[0].size
    assert ps.models[0].context_length == show.modelinfo["glm4v_moe.context_length"]
    assert ps.models[0].expires_at is not None
    version = httpx.get(f"{plain.url}/api/version", timeout=10).json()
    assert version["version"].count(".") == 2


def test_load_and_keep_alive(plain):
    loaded = plain.ollama.chat(plain.model, [], keep_alive="5m")
    assert loaded.done is True and loaded.done_reason == "load"
    loaded = plain.ollama.generate(plain.model, keep_alive=-1)
    assert loaded.done_reason == "load" and loaded.response == ""
    reply = plain.ollama.chat(
        plain.model, [{"role": "user", "content": "Hi"}], keep_alive="1h30m", options=GREEDY
    )
    assert reply.done is True


def refusal(call) -> ollama.ResponseError:
    with pytest.raises(ollama.ResponseError) as info:
        result = call()
        if not isinstance(result, ollama.ChatResponse | ollama.GenerateResponse):
            list(result)
    return info.value


@pytest.mark.parametrize("stream", [False, True])
def test_refusals_in_ollama_form(plain, stream):
    hi = [{"role": "user", "content": "Hi"}]
    chat = plain.ollama.chat
    cases = [
        (lambda: chat("nope", hi, stream=stream), 404, "'nope'"),
        (lambda: plain.ollama.show("nope"), 404, "'nope'"),
        (
            lambda: chat(plain.model, hi, options={"temperature": "hot"}, stream=stream),
            400,
            "options.temperature",
        ),
        (
            lambda: chat(plain.model, hi, options={"mirostat": 2}, stream=stream),
            400,
            "options.mirostat",
        ),
        (
            lambda: chat(plain.model, hi, options={"num_predict": 0}, stream=stream),
            400,
            "options.num_predict",
        ),
        (
            lambda: chat(
                plain.model, hi, format={"type": "array", "uniqueItems": True}, stream=stream
            ),
            400,
            "format",
        ),
        (lambda: chat(plain.model, hi, keep_alive="forever", stream=stream), 400, "keep_alive"),
        (lambda: chat(plain.model, hi, think="very", stream=stream), 400, "think"),
        (
            lambda: chat(plain.model, hi, options={**GREEDY, "num_ctx": 3}, stream=stream),
            400,
            "num_ctx",
        ),
        (lambda: plain.ollama.generate(plain.model, "x", raw=True, stream=stream), 400, "raw"),
    ]
    for call, status, named in cases:
        e = refusal(call)
        assert e.status_code == status, (named, e)
        assert named in e.error, (named, e.error)
    # the package checks images itself: a bad one is sent as another client would
    for path, body in (
        ("chat", {"messages": [{"role": "user", "content": "x", "images": ["@@notbase64"]}]}),
        ("generate", {"prompt": "x", "images": ["@@notbase64"]}),
    ):
        response = httpx.post(
            f"{plain.url}/api/{path}", json={"model": plain.model, **body}, timeout=10
        )
        assert response.status_code == 400, response.text
        assert response.json() == {"error": response.json()["error"]}
        assert "images[0] is not valid base64" in response.json()["error"]
    for calls, words in [  # an assistant turn's tool calls in the history
        ([{"function": {}}], "messages[1].tool_calls[0] needs a function with a name."),
        ([{"function": {"name": "f", "arguments": "{}"}}], "arguments must be an object."),
    ]:
        turn = {"role": "assistant", "content": "", "tool_calls": calls}
        messages = [{"role": "user", "content": "x"}, turn]
        response = httpx.post(
            f"{plain.url}/api/chat", json={"model": plain.model, "messages": messages}, timeout=10
        )
        assert response.status_code == 400 and response.json()["error"].endswith(words)
    response = httpx.post(f"{plain.url}/api/chat", content=b"{not json", timeout=10)
    assert response.status_code == 400 and set(response.json()) == {"error"}
    response = httpx.post(f"{plain.url}/api/pull", json={"model": "x"}, timeout=10)
    assert response.status_code in (404, 405) and set(response.json()) == {"error"}
    assert chat(plain.model, hi, options=GREEDY).done is True  # still serving
