"""OpenAI's chat completions <-> the neutral request: the body checked field by field, events
rendered as a completion or its chunks (tool arguments as fragments, as the model writes them).

Strict on purpose: a field we do not implement is refused with a 400 that names it (a client
that asks for `n=2` or JSON mode must not get something else silently); only fields that
change nothing about the reply (`user`, `metadata`, ...) are accepted and ignored.
"""

import json
import uuid
from dataclasses import fields

from ..generation.settings import GenerationSettings
from .formats import one_constraint, openai_response_format, openai_tool_choice
from .neutral import (
    DEFAULT_MAX_TOKENS,
    ApiError,
    Content,
    Finish,
    Logprob,
    Reasoning,
    Request,
    Served,
    ToolArgs,
    ToolStart,
    as_api_errors,
    bad,
    check_fields,
    check_model,
    check_settings,
    document_part,
    draft_choice,
    finish_messages,
    gather,
    media_budget,
    media_source,
    number,
    pdf_data_url,
    tool_calls,
)

# Fields we implement (the last five are extensions vLLM's and llama.cpp's servers take too).
SUPPORTED = {
    "draft",
    "draft_steps",
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "n",
    "response_format",
    "top_k",
    "min_p",
    "repetition_penalty",
    "chat_template_kwargs",
    "thinking_budget",
    "ignore_eos",
    "mm_processor_kwargs",
}
# Fields that do not change the reply: accepted and ignored.
IGNORED = {
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "safety_identifier",
    "prompt_cache_key",
}
# Fields we cannot honour: accepted only when they ask for nothing (null, or the default shown).
REFUSED = {
    "logit_bias": ({},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "functions": (),
    "function_call": (),
    "reasoning_effort": (),
    "web_search_options": (),
    "verbosity": (),
}
ROLES = ("system", "developer", "user", "assistant", "tool")
# Template arguments a client may not set through chat_template_kwargs.
RESERVED_TEMPLATE_ARGS = {"messages", "tools", "documents", "add_generation_prompt"}


# ---- field checks ------------------------------------------------------------------------------


def _bool(body, key):
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise bad(f"{key} must be true or false.", key)
    return value


def _text_of(content, where: str) -> str:
    """A message content that may hold text only: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in (
                "text",
                "input_text",
                "output_text",
            ):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"{where} may hold text parts only, not {kind!r}.", where)
            if not isinstance(part.get("text"), str):
                raise bad(f"{where}: a text part needs a string `text`.", where)
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"{where} must be a string or a list of content parts.", where)


def _user_content(content, where: str):
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"{where} must be a string or a list of content parts.", where)
    parts = []
    for i, part in enumerate(content):
        at = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text"):
            if not isinstance(part.get("text"), str):
                raise bad(f"{at}: a text part needs a string `text`.", at)
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image_url", "input_image"):
            url, detail = media_source(part, kind, at)
            parts.append({"type": "image", "source": url, "detail": detail, "param": at})
        elif kind == "video_url":
            url, _ = media_source(part, kind, at)
            parts.append({"type": "video", "source": url, "param": at})
        elif kind == "file":
            parts.append(_file(part, at))
        else:
            raise bad(
                f"{at}: content part type {kind!r} is not supported (text, image_url, input_image, "
                "video_url, file).",
                at,
            )
    return parts


def _file(part: dict, at: str) -> dict:
    """A `file` part: a PDF as `file.file_data` (a data: URL or base64); `pages` and `dpi` on
    the part choose its pages and their resolution."""
    file = part.get("file")
    if not isinstance(file, dict):
        raise bad(f"{at}: a file part needs a file object with file_data.", at)
    if file.get("file_data") is None and file.get("file_id") is not None:
        raise bad(
            f"{at}: file_id is not supported (this server keeps no files); send the PDF as "
            "file.file_data.",
            at,
        )
    data = file.get("file_data")
    if not isinstance(data, str) or not data:
        raise bad(f"{at}: a file part needs file.file_data (a base64 PDF).", at)
    return document_part(pdf_data_url(data), at, part)


def _arguments(value, at: str) -> dict:
    """A call's arguments: a JSON string of an object (or the object)."""
    value = value or "{}"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise bad(f"{at}.function.arguments is not valid JSON.", at) from None
    if not isinstance(value, dict):
        raise bad(f"{at}.function.arguments must be a JSON object.", at)
    return value


def parse_messages(messages) -> list:
    """OpenAI messages -> the template's messages; media stay references for media.py to resolve."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list.", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object.", where)
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role {role!r} must be one of {', '.join(ROLES)}.", f"{where}.role")
        content = m.get("content")
        if role in ("system", "developer"):
            out.append({"role": "system", "content": _text_of(content, f"{where}.content")})
        elif role == "user":
            out.append({"role": "user", "content": _user_content(content, f"{where}.content")})
        elif role == "tool":
            out.append(
                {
                    "role": "tool",
                    "content": _text_of(content, f"{where}.content"),
                    **({"tool_call_id": m["tool_call_id"]} if m.get("tool_call_id") else {}),
                }
            )
        else:
            message = {
                "role": "assistant",
                "content": "" if content is None else _text_of(content, f"{where}.content"),
            }
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            if isinstance(reasoning, str):
                message["reasoning_content"] = reasoning
            if m.get("tool_calls"):
                message["tool_calls"] = tool_calls(
                    m["tool_calls"], f"{where}.tool_calls", _arguments
                )
            out.append(message)
    return out


def _check_body(body, served: Served):
    """Every field known and none refused, the served model, one choice."""
    check_fields(
        body,
        SUPPORTED | IGNORED,
        REFUSED,
        {"functions": "; use tools", "function_call": "; use tools"},
    )
    check_model(body.get("model"), served)
    if number(body, "n", integer=True) not in (None, 1):
        raise bad(f"n={body['n']} is not supported: one choice per request.", "n")


def _tools(body, served: Served) -> tuple:
    """(tools, tool_choice): None, None when no tool may be called."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise bad("tool_choice needs tools.", "tool_choice")
        return None, None
    if not isinstance(tools, list):
        raise bad("tools must be a list.", "tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
        ):
            raise bad(
                f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}.',
                f"tools[{i}]",
            )
    if choice == "none":
        return None, None  # no tools offered, so none called
    if not served.tools_supported:
        raise bad(
            "tools are not supported: this model's chat template does not render them.", "tools"
        )
    return tools, choice  # "required" or a named function: forced by a constraint (formats.py)


def _constraint(body, tools, tool_choice):
    """The one structured-output constraint: response_format's, or a forced tool call's."""
    with as_api_errors():
        return one_constraint(
            openai_response_format(body.get("response_format")),
            openai_tool_choice(tool_choice, tools),
            "response_format",
        )


def _streaming(body) -> tuple:
    """(stream, include_usage)."""
    stream = bool(_bool(body, "stream"))
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise bad(
            "stream_options is only allowed with stream: true, as an object.", "stream_options"
        )
    return stream, bool(options and options.get("include_usage"))


def _max_tokens(body):
    """max_completion_tokens, or the older max_tokens (None: neither)."""
    max_tokens = number(body, "max_completion_tokens", 1, integer=True)
    if max_tokens is None:
        max_tokens = number(body, "max_tokens", 1, integer=True)
    return max_tokens


def _stop(body) -> list:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (
        not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop)
    ):
        raise bad("stop must be a string or a list of at most 4 strings.", "stop")
    return stop


def _top_logprobs(body):
    """How many alternatives each token's log-probability comes with; None: no log-probabilities."""
    logprobs = _bool(body, "logprobs")
    top = number(body, "top_logprobs", 0, 20, integer=True)
    if top is not None and not logprobs:
        raise bad("top_logprobs needs logprobs: true.", "top_logprobs")
    return (top or 0) if logprobs else None


def _template_kwargs(body) -> dict:
    template_kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict) or RESERVED_TEMPLATE_ARGS & set(template_kwargs):
        raise bad(
            "chat_template_kwargs must be an object and may not set messages, tools, documents or "
            "add_generation_prompt.",
            "chat_template_kwargs",
        )
    return dict(template_kwargs)


def _settings(body, max_tokens, stop, top_k, constraint) -> dict:
    """GenerationSettings' keyword arguments, OpenAI's defaults for the fields not given."""
    settings = dict(
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        temp=number(body, "temperature", 0, 2) if body.get("temperature") is not None else 1.0,
        top_p=number(body, "top_p", 0, 1) if body.get("top_p") is not None else 1.0,
        top_k=max(top_k or 0, 0),
        min_p=number(body, "min_p", 0, 1) or 0.0,
        repetition_penalty=number(body, "repetition_penalty", 0),
        stop=stop or (),
        ignore_eos=bool(_bool(body, "ignore_eos")),
        constraint=constraint,
    )
    supported = {f.name for f in fields(GenerationSettings)}
    for key, lo, hi in (
        ("presence_penalty", -2, 2),
        ("frequency_penalty", -2, 2),
        ("thinking_budget", 0, None),
    ):
        value = number(body, key, lo, hi, integer=key == "thinking_budget")
        if value is None or (value == 0 and key != "thinking_budget"):
            continue
        if key not in supported:
            raise bad(f"{key} is not supported by this server.", key)
        settings[key] = value
    check_settings(settings)
    return settings


def parse(body, served: Served) -> Request:
    """Check a chat-completions body and turn it into the neutral `Request`; an `ApiError` for
    the first problem (the steps run in this order, which decides the problem named first)."""
    _check_body(body, served)
    messages = finish_messages(parse_messages(body.get("messages")), served)
    tools, tool_choice = _tools(body, served)
    constraint = _constraint(body, tools, tool_choice)
    stream, include_usage = _streaming(body)
    max_tokens, stop = _max_tokens(body), _stop(body)
    top_logprobs = _top_logprobs(body)
    top_k = number(body, "top_k", -1, integer=True)
    template_kwargs = _template_kwargs(body)
    settings = _settings(body, max_tokens, stop, top_k, constraint)
    return Request(
        messages,
        settings,
        seed=number(body, "seed", 0, 2**64 - 1, integer=True),
        stream=stream,
        top_logprobs=top_logprobs,
        tools=tools,
        tool_choice=tools and "auto",
        constraint=constraint,
        template_kwargs=template_kwargs,
        options={"include_usage": include_usage},
        media_budget=media_budget(body),
        draft=draft_choice(body),
    )


# ---- replies ------------------------------------------------------------------------------------


def reply_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def error_body(e: ApiError) -> dict:
    return e.body()


def usage_body(usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        **({"drafts": usage.drafts} if usage.drafts else {}),
    }


def logprob_entry(decode, token: int, logprob: float, alternatives) -> dict:
    def one(t, lp):
        text = decode(t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in alternatives or []]}


def tool_call(call) -> dict:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def whole(request: Request, events: list, meta) -> dict:
    """The chat.completion object of a reply's events (boxes: our one extra field)."""
    reply = gather(events)
    message = {
        "role": "assistant",
        "content": reply.content if reply.content or not reply.calls else None,
    }
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    if reply.calls:
        message["tool_calls"] = [tool_call(c) for c in reply.calls]
    message["boxes"] = reply.finish.boxes
    logprobs = {"content": reply.logprobs} if request.top_logprobs is not None else None
    choice = {
        "index": 0,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": reply.finish.reason,
    }
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [choice],
        "usage": usage_body(reply.finish.usage),
    }


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def delta_of(event):
    """One event as a chat-completions delta (None: nothing to send)."""
    if isinstance(event, Reasoning):
        return {"reasoning_content": event.text}
    if isinstance(event, Content):
        return {"content": event.text}
    if isinstance(event, ToolStart):
        return {
            "tool_calls": [
                {
                    "index": event.index,
                    "id": event.id,
                    "type": "function",
                    "function": {"name": event.name, "arguments": ""},
                }
            ]
        }
    if isinstance(event, ToolArgs):
        return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}
    return None


class Stream:
    """Events -> chat.completion.chunk SSE lines; a token's log-probability rides on its first
    chunk."""

    def __init__(self, request: Request, meta):
        self.request, self.meta = request, meta

    def chunk(self, delta, finish=None, logprobs=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse(
            {
                "id": self.meta.id,
                "object": "chat.completion.chunk",
                "created": self.meta.created,
                "model": self.meta.model,
                "choices": [choice],
            }
        )

    def head(self) -> list:
        return [self.chunk({"role": "assistant", "content": ""})]

    def keepalive(self) -> str:
        return ": keepalive\n\n"

    def feed(self, events) -> list:
        out, logprob = [], None
        for e in events:
            if isinstance(e, Logprob):
                logprob = {"content": [e.entry]}
            elif isinstance(e, Finish):
                if logprob:
                    out.append(self.chunk({}, logprobs=logprob))
                out.append(self.chunk({"boxes": e.boxes}, e.reason))
                if self.request.options.get("include_usage"):
                    out.append(
                        sse(
                            {
                                "id": self.meta.id,
                                "object": "chat.completion.chunk",
                                "created": self.meta.created,
                                "model": self.meta.model,
                                "choices": [],
                                "usage": usage_body(e.usage),
                            }
                        )
                    )
            elif (delta := delta_of(e)) is not None:
                out.append(self.chunk(delta, logprobs=logprob))
                logprob = None
        if logprob:
            out.append(self.chunk({}, logprobs=logprob))
        return out

    def fail(self, e: ApiError) -> list:
        return [sse(e.body())]

    def tail(self) -> list:
        return ["data: [DONE]\n\n"]
