"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens) <-> the neutral request.

Built for what Claude Code sends: system text blocks, tools with `input_schema`, `thinking`,
`output_config`, `context_management`, `cache_control` (our prefix cache is automatic), server
tools (left out and logged). Thinking comes back as thinking blocks whose `signature` seals
their text for this server only (neutral.py's key); thinking blocks sent back are restored from
it (GLM-4.5V places thinking after the last user turn), foreign or stale ones dropped. Usage
counts the prompt tokens read from the prefix cache as `cache_read_input_tokens`, the rest as
`input_tokens` (`cache_creation_input_tokens` is 0: caching costs nothing extra here).
"""

import json
import logging
import uuid

from .formats import FormatError, anthropic_output_format, anthropic_tool_choice, one_constraint
from .neutral import (
    ApiError,
    Content,
    Finish,
    Reasoning,
    Request,
    Served,
    ToolArgs,
    ToolEnd,
    ToolStart,
    as_api_errors,
    bad,
    check_fields,
    check_model,
    check_settings,
    document_part,
    draft_choice,
    effort,
    finish_messages,
    function_tool,
    media_budget,
    no_thinking,
    number,
    offered_tools,
    seal,
    unknown_fields,
    unseal,
)

log = logging.getLogger("mlx_glm4v.server")

SUPPORTED = {
    "draft",
    "draft_steps",
    "model",
    "messages",
    "max_tokens",
    "system",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "thinking",
    "output_config",
    "output_format",
    "mm_processor_kwargs",
}
# Accepted, without effect on the reply.
IGNORED = {
    "metadata",
    "context_management",
    "service_tier",
    "cache_control",
    "inference_geo",
    "speed",
    "diagnostics",
    "user_profile_id",
    "workspace_id",
}
# Refused unless empty.
REFUSED = {"mcp_servers": ([],), "container": ()}
BILLING = "x-anthropic-billing-header:"
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "cancelled": "end_turn",
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "overloaded_error",
    499: "invalid_request_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_body(e: ApiError) -> dict:
    return {
        "type": "error",
        "error": {"type": ERROR_TYPES.get(e.status, "api_error"), "message": e.message},
    }


# ---- the request -------------------------------------------------------------------------------


def _text(block, at: str) -> str:
    if not isinstance(block.get("text"), str):
        raise bad(f"{at}: a text block needs a string text.", at)
    return block["text"]


def _image(block, at: str) -> dict:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if (
        kind == "base64"
        and isinstance(source.get("data"), str)
        and isinstance(source.get("media_type"), str)
    ):
        url = f"data:{source['media_type']};base64,{source['data']}"
    elif kind == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise bad(f"{at}: an image needs a base64 source (media_type, data) or a url source.", at)
    return {"type": "image", "source": url, "detail": "auto", "param": at}


def _document(block, at: str) -> dict:
    """A document block: a PDF (a base64 source with media_type application/pdf, or a url
    source), each page an image; plain text (a text source) as text. `pages` and `dpi` on the
    block choose the pages and their resolution."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "text" and isinstance(source.get("data"), str):
        return {"type": "text", "text": source["data"]}
    if kind == "base64" and isinstance(source.get("data"), str):
        if source.get("media_type") != "application/pdf":
            raise bad(
                f"{at}: a base64 document must have media_type application/pdf, not "
                f"{source.get('media_type')!r}.",
                at,
            )
        return document_part(f"data:application/pdf;base64,{source['data']}", at, block)
    if kind == "url" and isinstance(source.get("url"), str):
        return document_part(source["url"], at, block)
    if kind == "file":
        raise bad(
            f"{at}: file sources are not supported (this server keeps no files); send the PDF "
            "as a base64 source.",
            at,
        )
    raise bad(
        f"{at}: a block of type 'document' needs a base64 PDF source (media_type "
        "application/pdf, data), a url source or a text source.",
        at,
    )


def _system(system) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    if not isinstance(system, list):
        raise bad("system must be a string or a list of text blocks.", "system")
    texts = []
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise bad(f"system[{i}] must be a text block.", f"system[{i}]")
        text = _text(block, f"system[{i}]")
        if not text.startswith(BILLING):  # Claude Code's per-version header is not for the model
            texts.append(text)
    return "\n".join(texts)


def _tool_result(block, at: str) -> tuple:
    """(the tool message, its images): a tool result's text goes in its turn, its images after
    it."""
    content, images = block.get("content", ""), []
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(_text(part, f"{at}.content[{j}]"))
            elif kind == "image":
                images.append(_image(part, f"{at}.content[{j}]"))
            else:
                raise bad(
                    f"{at}.content[{j}]: block type {kind!r} is not supported in a tool result "
                    "(text, image).",
                    f"{at}.content[{j}]",
                )
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise bad(f"{at}.content must be a string or a list of blocks.", at)
    message = {"role": "tool", "content": content}
    if isinstance(block.get("tool_use_id"), str):
        message["tool_call_id"] = block["tool_use_id"]
    return message, images


def _thinking(block) -> str:
    """The thinking a block carries, when its signature is one of ours; else None (dropped)."""
    text = unseal(block.get("signature"))
    if text is None or (block.get("thinking") and block["thinking"] != text):
        log.info(
            "a thinking block's signature is not this server's (or predates a restart): dropped"
        )
        return None
    return text


def parse_messages(messages) -> list:
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list.", "messages")
    out = []

    def flush(parts):
        if parts:
            out.append(
                {
                    "role": "user",
                    "content": list(parts)
                    if any(p["type"] in ("image", "document") for p in parts)
                    else "".join(p["text"] for p in parts),
                }
            )
            parts.clear()

    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant", "system"):
            raise bad(f"{where}.role {role!r} must be user, assistant or system.", f"{where}.role")
        content = m.get("content")
        if role == "system":  # Claude Code puts its environment here: a system turn in place
            out.append({"role": "system", "content": _system(content)})
            continue
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad(f"{where}.content must be a string or a list of blocks.", f"{where}.content")
        if role == "assistant":
            message = {"role": "assistant", "content": ""}
            for j, block in enumerate(content):
                at, kind = (
                    f"{where}.content[{j}]",
                    block.get("type") if isinstance(block, dict) else None,
                )
                if kind == "text":
                    message["content"] += _text(block, at)
                elif kind == "tool_use":
                    if not isinstance(block.get("name"), str) or not isinstance(
                        block.get("input", {}), dict
                    ):
                        raise bad(f"{at}: a tool_use block needs a name and an input object.", at)
                    message.setdefault("tool_calls", []).append(
                        {
                            "id": block.get("id"),
                            "type": "function",
                            "function": {
                                "name": block["name"],
                                "arguments": block.get("input", {}),
                            },
                        }
                    )
                elif kind == "thinking":
                    if (text := _thinking(block)) is not None:
                        message["reasoning_content"] = text
                elif kind != "redacted_thinking":
                    raise bad(
                        f"{at}: block type {kind!r} is not supported in an assistant turn (text, "
                        "tool_use, thinking).",
                        at,
                    )
            out.append(message)
            continue
        parts = []  # a user turn: tool results become tool turns, the rest a user turn in place
        for j, block in enumerate(content):
            at, kind = (
                f"{where}.content[{j}]",
                block.get("type") if isinstance(block, dict) else None,
            )
            if kind == "text":
                parts.append({"type": "text", "text": _text(block, at)})
            elif kind == "image":
                parts.append(_image(block, at))
            elif kind == "document":
                parts.append(_document(block, at))
            elif kind == "tool_result":
                flush(parts)
                message, images = _tool_result(block, at)
                out.append(message)
                parts.extend(images)
            else:
                raise bad(
                    f"{at}: block type {kind!r} is not supported (text, image, document, "
                    "tool_result).",
                    at,
                )
        flush(parts)
    return out


def _tool(i: int, tool):
    if not isinstance(tool, dict):
        raise bad(f"tools[{i}] must be an object.", f"tools[{i}]")
    if tool.get("type") not in (None, "custom"):
        log.info("tools[%d]: the server tool %r cannot run here; left out", i, tool.get("type"))
        return None
    if tool.get("defer_loading"):  # shown to the model only once a tool search finds it
        log.info("tools[%d]: %r is deferred (defer_loading); left out", i, tool.get("name"))
        return None
    return function_tool(
        tool.get("name"), tool.get("description"), tool.get("input_schema"), f"tools[{i}]"
    )


def parse(body, served: Served, counting: bool = False) -> Request:
    check_fields(body, SUPPORTED | IGNORED, REFUSED)
    check_model(body.get("model"), served)
    max_tokens = number(body, "max_tokens", 1, integer=True)
    if max_tokens is None and not counting:
        raise bad("max_tokens is required.", "max_tokens")
    messages = parse_messages(body.get("messages"))
    if system := _system(body.get("system")):
        messages.insert(0, {"role": "system", "content": system})
    stop = body.get("stop_sequences") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop_sequences must be a list of non-empty strings.", "stop_sequences")
    temperature, top_p = number(body, "temperature", 0, 1), number(body, "top_p", 0, 1)
    settings = dict(
        max_tokens=max_tokens,
        temp=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=number(body, "top_k", 0, integer=True) or 0,
        stop=tuple(stop),
    )
    tools, tool_choice = offered_tools(body, served, _tool)
    config = body.get("output_config") or {}
    if not isinstance(config, dict):
        raise bad("output_config must be an object.", "output_config")
    unknown_fields(config, {"effort", "format"}, "output_config")
    with as_api_errors():
        if config.get("format") is not None and body.get("output_format") is not None:
            raise FormatError(
                "give output_config.format or the beta's output_format, not both.", "output_format"
            )
        output = (
            anthropic_output_format(config.get("format"))
            # the beta's spelling
            or anthropic_output_format(body.get("output_format"), "output_format")
        )
        settings["constraint"] = one_constraint(
            output, anthropic_tool_choice(tool_choice, tools), "output_config.format"
        )
    request = Request(
        finish_messages(messages, served),
        settings,
        stream=bool(body.get("stream")),
        tools=tools,
        tool_choice=tools and "auto",
        constraint=settings["constraint"],
        media_budget=media_budget(body),
        draft=draft_choice(body),
    )
    thinking = body.get("thinking") or {"type": "adaptive"}
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "enabled":
        budget = number(thinking, "budget_tokens", 0, integer=True, where="thinking.budget_tokens")
        if budget is None:
            raise bad(
                "thinking.budget_tokens is required with thinking enabled.",
                "thinking.budget_tokens",
            )
        settings["thinking_budget"] = budget
    elif kind == "disabled":
        no_thinking(request, served)
    elif kind == "adaptive":
        effort(request, served, config.get("effort"), "output_config.effort")
    else:
        raise bad(f"thinking type {kind!r} must be enabled, disabled or adaptive.", "thinking")
    request.options = {
        "omit_thinking": isinstance(thinking, dict) and thinking.get("display") == "omitted"
    }
    check_settings(settings)
    return request


# ---- the reply ---------------------------------------------------------------------------------


def reply_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def usage_body(usage) -> dict:
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
        **({"drafts": usage.drafts} if usage.drafts else {}),
    }


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


class Stream:
    """Events -> the message and Anthropic's SSE events; whole replies run the same builder."""

    def __init__(self, request: Request, meta):
        self.request, self.meta = request, meta
        self.omit = request.options.get("omit_thinking", False)
        self.block = None
        self.message = {
            "id": meta.id,
            "type": "message",
            "role": "assistant",
            "model": meta.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": meta.prompt_tokens,
                "output_tokens": 0,
                "cache_read_input_tokens": None,
                "cache_creation_input_tokens": None,
            },
        }

    @staticmethod
    def event(kind: str, **fields) -> str:
        return (
            f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n"
        )

    def head(self) -> list:
        """message_start goes out before the prompt is read: its usage counts the whole prompt as
        input, the cache split unknown (null); message_delta carries the split."""
        return [
            self.event("message_start", message=json.loads(json.dumps(self.message))),
            self.event("ping"),
        ]

    def keepalive(self) -> str:
        return self.event("ping")

    def _open(self, block: dict) -> list:
        out = self._close()
        self.block = block
        self.message["content"].append(block)
        start = {**block, "input": {}} if block["type"] == "tool_use" else dict(block)
        start.pop("_json", None)
        return out + [
            self.event(
                "content_block_start", index=len(self.message["content"]) - 1, content_block=start
            )
        ]

    def _delta(self, delta: dict) -> str:
        return self.event(
            "content_block_delta", index=len(self.message["content"]) - 1, delta=delta
        )

    def _close(self) -> list:
        block, self.block = self.block, None
        if block is None:
            return []
        out = []
        if block["type"] == "thinking":
            block["signature"] = seal(block.pop("_text"))
            out.append(self._delta({"type": "signature_delta", "signature": block["signature"]}))
        elif block["type"] == "tool_use":
            block["input"] = json.loads(block.pop("_json"))
        return out + [self.event("content_block_stop", index=len(self.message["content"]) - 1)]

    def feed(self, events) -> list:
        out = []
        for e in events:
            kind = self.block and self.block["type"]
            if isinstance(e, Reasoning):
                if kind != "thinking":
                    out += self._open(
                        {"type": "thinking", "thinking": "", "signature": "", "_text": ""}
                    )
                self.block["_text"] += e.text
                if not self.omit:
                    self.block["thinking"] += e.text
                    out.append(self._delta({"type": "thinking_delta", "thinking": e.text}))
            elif isinstance(e, Content):
                if kind != "text":
                    out += self._open({"type": "text", "text": ""})
                self.block["text"] += e.text
                out.append(self._delta({"type": "text_delta", "text": e.text}))
            elif isinstance(e, ToolStart):
                out += self._open(
                    {
                        "type": "tool_use",
                        "id": tool_use_id(e.id),
                        "name": e.name,
                        "input": {},
                        "_json": "",
                    }
                )
            elif isinstance(e, ToolArgs):
                self.block["_json"] += e.text
                out.append(self._delta({"type": "input_json_delta", "partial_json": e.text}))
            elif isinstance(e, ToolEnd):
                out += self._close()
            elif isinstance(e, Finish):
                out += self._close()
                reason = (
                    "stop_sequence"
                    if e.stop_sequence is not None
                    else STOP_REASONS.get(e.reason, "end_turn")
                )
                self.message.update(
                    stop_reason=reason, stop_sequence=e.stop_sequence, usage=usage_body(e.usage)
                )
                out.append(
                    self.event(
                        "message_delta",
                        delta={"stop_reason": reason, "stop_sequence": e.stop_sequence},
                        usage=usage_body(e.usage),
                    )
                )
                out.append(self.event("message_stop"))
        return out

    def fail(self, e: ApiError) -> list:
        return [self.event("error", error=error_body(e)["error"])]

    def tail(self) -> list:
        return []


def whole(request: Request, events: list, meta) -> dict:
    builder = Stream(request, meta)
    builder.feed(events)
    return builder.message
