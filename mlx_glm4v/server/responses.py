"""OpenAI's Responses API (POST /v1/responses, GET/DELETE /v1/responses/{id}) <-> the neutral
request.

What Codex CLI sends is accepted as it is: hosted tools (web_search, ...) cannot run here, so
they are left out of the prompt and logged, never refused. Reasoning comes back as a reasoning
item (its text as `reasoning_text`), sealed in `encrypted_content` when asked; reasoning items
sent back are restored for the template (GLM-4.5V places thinking after the last user turn),
foreign or stale ones dropped. Replies are kept in a bounded in-memory store (count and bytes)
for `previous_response_id` and GET, unless `store: false`.
"""

import json
import logging
import uuid
from collections import OrderedDict

from .formats import one_constraint, responses_text_format, responses_tool_choice
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
    media_source,
    number,
    offered_tools,
    pdf_data_url,
    seal,
    unknown_fields,
    unseal,
)

log = logging.getLogger("mlx_glm4v.server")

SUPPORTED = {
    "draft",
    "draft_steps",
    "model",
    "input",
    "instructions",
    "stream",
    "max_output_tokens",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "reasoning",
    "text",
    "store",
    "previous_response_id",
    "include",
    "seed",
    "top_k",
    "mm_processor_kwargs",
}
# Accepted, without effect on the reply.
IGNORED = {
    "parallel_tool_calls",
    "prompt_cache_key",
    "client_metadata",
    "metadata",
    "user",
    "safety_identifier",
    "service_tier",
    "truncation",
    "stream_options",
    "prompt_cache_retention",
    "background",
    "max_tool_calls",
    "top_logprobs",
}
# Asking for these is refused unless they ask for nothing.
REFUSED = {"background": (False,), "top_logprobs": (0,), "conversation": (), "prompt": ()}
HOSTED = {
    "web_search",
    "web_search_preview",
    "web_search_preview_2025_03_11",
    "file_search",
    "code_interpreter",
    "computer_use_preview",
    "computer_use",
    "image_generation",
    "mcp",
    "local_shell",
    "custom",
    "shell",
    "apply_patch",
}
INCLUDE = {
    "reasoning.encrypted_content",
    "web_search_call.action.sources",
    "web_search_call.results",
    "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
    "file_search_call.results",
    "message.input_image.image_url",
}


# ---- the store ---------------------------------------------------------------------------------


class Store:
    """Finished responses, newest last, dropped oldest first past `count` entries or `max_bytes`."""

    def __init__(self, count: int, max_bytes: int):
        self.count, self.max_bytes = count, max_bytes
        self.items, self.bytes = OrderedDict(), 0

    def put(self, rid: str, response: dict, history: list):
        size = len(json.dumps(response)) + len(json.dumps(history))
        self.items[rid] = (response, history, size)
        self.bytes += size
        while self.items and (len(self.items) > self.count or self.bytes > self.max_bytes):
            _, (_, _, dropped) = self.items.popitem(last=False)
            self.bytes -= dropped

    def get(self, rid):
        return self.items.get(rid)

    def pop(self, rid):
        item = self.items.pop(rid, None)
        if item is not None:
            self.bytes -= item[2]
        return item


def _missing(rid) -> ApiError:
    return ApiError(404, f"no stored response with id {rid!r}.", "response_id", "not_found")


def retrieve(store: Store, rid: str) -> dict:
    item = store.get(rid)
    if item is None:
        raise _missing(rid)
    return item[0]


def delete(store: Store, rid: str) -> dict:
    if store.pop(rid) is None:
        raise _missing(rid)
    return {"id": rid, "object": "response", "deleted": True}


# ---- the request -------------------------------------------------------------------------------


def _parts(content, where: str, role: str):
    """A message's content -> the template's content (a string, or parts with media references)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"{where} must be a string or a list of content parts.", where)
    parts = []
    for i, part in enumerate(content):
        at = f"{where}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal"):
            text = part.get("refusal") if kind == "refusal" else part.get("text")
            if not isinstance(text, str):
                raise bad(f"{at}: a {kind} part needs a string text.", at)
            parts.append({"type": "text", "text": text})
        elif kind == "input_image" and role == "user":
            if part.get("file_id") and not part.get("image_url"):
                raise bad(
                    f"{at}: file_id images are not supported; send image_url (a data: URL).", at
                )
            url, detail = media_source(part, kind, at)
            parts.append({"type": "image", "source": url, "detail": detail, "param": at})
        elif kind == "input_file" and role == "user":
            parts.append(_input_file(part, at))
        else:
            raise bad(
                f"{at}: content part type {kind!r} is not supported here (input_text, input_image, "
                "input_file, output_text).",
                at,
            )
    if role != "user" or all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _input_file(part: dict, at: str) -> dict:
    """An `input_file` part: a PDF as `file_data` (a data: URL or base64) or `file_url` (read as
    an image URL is); `pages` and `dpi` choose its pages and their resolution."""
    data, url = part.get("file_data"), part.get("file_url")
    if data is None and url is None and part.get("file_id") is not None:
        raise bad(
            f"{at}: file_id is not supported (this server keeps no files); send the PDF as "
            "file_data.",
            at,
        )
    if isinstance(data, str) and data:
        return document_part(pdf_data_url(data), at, part)
    if isinstance(url, str) and url:
        return document_part(url, at, part)
    raise bad(f"{at}: an input_file part needs file_data (a base64 PDF) or file_url.", at)


def _arguments(value, where: str) -> dict:
    try:
        arguments = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        raise bad(f"{where}.arguments is not valid JSON.", where) from None
    if not isinstance(arguments, dict):
        raise bad(f"{where}.arguments must be a JSON object.", where)
    return arguments


def _reasoning_of(item: dict):
    """The thinking a reasoning item carries: ours sealed, or its plain reasoning text; None if
    neither."""
    if item.get("encrypted_content"):
        text = unseal(item["encrypted_content"])
        if text is None:
            log.info(
                "a reasoning item's encrypted_content is not this server's (or predates a "
                "restart): dropped"
            )
        return text
    texts = [c.get("text") for c in item.get("content") or [] if isinstance(c, dict)]
    return "".join(t for t in texts if isinstance(t, str)) or None


def parse_input(items) -> list:
    """Responses input -> the template's messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise bad("input must be a string or a non-empty list of items.", "input")
    out, reasoning = [], None

    def assistant():
        """The assistant message the next call or reasoning belongs to (a new one after anything
        else)."""
        nonlocal reasoning
        if not out or out[-1]["role"] != "assistant" or out[-1].get("_closed"):
            out.append({"role": "assistant", "content": ""})
        if reasoning is not None:
            out[-1]["reasoning_content"], reasoning = reasoning, None
        return out[-1]

    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(f"{where} must be an object.", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad(
                    f"{where}.role {role!r} must be user, assistant, system or developer.",
                    f"{where}.role",
                )
            content = _parts(item.get("content"), f"{where}.content", role)
            if role == "assistant":
                message = assistant()
                if message.get("tool_calls"):  # text after a call: a turn of its own
                    message["_closed"] = True
                    message = assistant()
                message["content"] += content
            else:
                out.append({"role": "system" if role == "developer" else role, "content": content})
        elif kind == "function_call":
            if not isinstance(item.get("name"), str):
                raise bad(f"{where} needs a name.", where)
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {
                    "name": item["name"],
                    "arguments": _arguments(item.get("arguments", "{}"), where),
                },
            }
            assistant().setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                output = _parts(output, f"{where}.output", "tool")
            if not isinstance(output, str):
                raise bad(f"{where}.output must be a string or text parts.", f"{where}.output")
            out.append(
                {
                    "role": "tool",
                    "content": output,
                    **({"tool_call_id": item["call_id"]} if item.get("call_id") else {}),
                }
            )
        elif kind == "reasoning":
            reasoning = _reasoning_of(item)
        else:
            raise bad(
                f"{where}: input item type {kind!r} is not supported (message, function_call, "
                "function_call_output, reasoning).",
                where,
            )
    for m in out:
        m.pop("_closed", None)
    return out


def _tool(i: int, tool):
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind == "function":
        unknown_fields(tool, {"type", "name", "description", "parameters", "strict"}, f"tools[{i}]")
        return function_tool(
            tool.get("name"), tool.get("description"), tool.get("parameters"), f"tools[{i}]"
        )
    if isinstance(kind, str) and (kind in HOSTED or kind.startswith(tuple(HOSTED))):
        log.info("tools[%d]: the hosted tool %r cannot run here; left out", i, kind)
    # Codex's sub-agent tools, called by a namespaced name we cannot write
    elif kind == "namespace":
        log.info("tools[%d]: the tool namespace %r is left out", i, tool.get("name"))
    else:
        raise bad(f"tools[{i}]: tool type {kind!r} is not supported (function).", f"tools[{i}]")
    return None


def parse(body, served: Served) -> Request:
    check_fields(body, SUPPORTED | IGNORED, REFUSED)
    check_model(body.get("model"), served)
    text = body.get("text") or {}
    if not isinstance(text, dict):
        raise bad("text must be an object.", "text")
    unknown_fields(text, {"format", "verbosity"}, "text")
    include = body.get("include") or []
    if not isinstance(include, list) or any(i not in INCLUDE for i in include):
        wrong = (
            next((i for i in include if i not in INCLUDE), include)
            if isinstance(include, list)
            else include
        )
        raise bad(f"include {wrong!r} is not supported ({', '.join(sorted(INCLUDE))}).", "include")
    store = body.get("store", True)
    if not isinstance(store, bool):
        raise bad("store must be true or false.", "store")

    history = []
    previous = body.get("previous_response_id")
    if previous is not None:
        item = served.store.get(previous) if served.store is not None else None
        if item is None:
            raise bad(
                f"previous_response_id {previous!r}: no such stored response.",
                "previous_response_id",
            )
        history = [dict(m) for m in item[1]]
    history += parse_input(body.get("input"))
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad("instructions must be a string.", "instructions")
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + history
    tools, tool_choice = offered_tools(body, served, _tool)
    with as_api_errors():
        constraint = one_constraint(
            responses_text_format(text), responses_tool_choice(tool_choice, tools), "text.format"
        )

    temperature = number(body, "temperature", 0, 2)
    top_p = number(body, "top_p", 0, 1)
    settings = dict(
        max_tokens=number(body, "max_output_tokens", 1, integer=True),
        temp=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=number(body, "top_k", 0, integer=True) or 0,
        constraint=constraint,
    )
    request = Request(
        finish_messages(messages, served),
        settings,
        seed=number(body, "seed", 0, 2**64 - 1, integer=True),
        stream=bool(body.get("stream")),
        tools=tools,
        tool_choice=tools and "auto",
        constraint=constraint,
        media_budget=media_budget(body),
        draft=draft_choice(body),
    )
    reasoning = body.get("reasoning") or {}
    if not isinstance(reasoning, dict):
        raise bad("reasoning must be an object.", "reasoning")
    unknown_fields(reasoning, {"effort", "summary", "generate_summary"}, "reasoning")
    effort(request, served, reasoning.get("effort"), "reasoning.effort")
    check_settings(settings)
    request.options = {
        "store": store,
        "sealed": "reasoning.encrypted_content" in include,
        "history": history,
        "echo": {
            "instructions": instructions,
            "previous_response_id": previous,
            "max_output_tokens": settings["max_tokens"],
            "temperature": settings["temp"],
            "top_p": settings["top_p"],
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
            "tool_choice": body.get("tool_choice") or "auto",
            "store": store,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "tools": body.get("tools") or [],
            "metadata": body.get("metadata") or {},
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
        },
    }
    return request


# ---- the reply ---------------------------------------------------------------------------------


def reply_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def error_body(e: ApiError) -> dict:
    return e.body()


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class Stream:
    """Events -> the Responses object and its SSE events (each with its sequence_number).

    Whole replies run the same builder and keep only the object, so both forms hold the same items.
    """

    def __init__(self, request: Request, meta):
        self.request, self.meta = request, meta
        self.sequence, self.item = 0, None
        self.response = {
            "id": meta.id,
            "object": "response",
            "created_at": meta.created,
            "status": "in_progress",
            "error": None,
            "incomplete_details": None,
            "model": meta.model,
            "output": [],
            "usage": None,
            **request.options["echo"],
        }

    def event(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def snapshot(self) -> dict:
        return json.loads(json.dumps(self.response))

    def head(self) -> list:
        return [
            self.event("response.created", response=self.snapshot()),
            self.event("response.in_progress", response=self.snapshot()),
        ]

    def keepalive(self) -> str:
        return ": keepalive\n\n"

    def _open(self, item: dict) -> list:
        out = self._close()
        self.item = item
        at = len(self.response["output"])
        self.response["output"].append(item)
        out.append(
            self.event(
                "response.output_item.added", output_index=at, item=self.snapshot()["output"][at]
            )
        )
        if item["type"] == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item["content"].append(part)
            out.append(
                self.event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=at,
                    content_index=0,
                    part=dict(part),
                )
            )
        elif item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": ""}
            item["content"].append(part)
            out.append(
                self.event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=at,
                    content_index=0,
                    part=dict(part),
                )
            )
        return out

    def _close(self) -> list:
        item, self.item = self.item, None
        if item is None:
            return []
        at, out = len(self.response["output"]) - 1, []
        ids = dict(item_id=item["id"], output_index=at)
        if item["type"] in ("message", "reasoning"):
            part = item["content"][0]
            kind = "output_text" if item["type"] == "message" else "reasoning_text"
            out.append(
                self.event(
                    f"response.{kind}.done",
                    **ids,
                    content_index=0,
                    text=part["text"],
                    **({"logprobs": []} if kind == "output_text" else {}),
                )
            )
            out.append(
                self.event("response.content_part.done", **ids, content_index=0, part=dict(part))
            )
            if item["type"] == "reasoning" and self.request.options["sealed"]:
                item["encrypted_content"] = seal(part["text"])
        else:
            out.append(
                self.event(
                    "response.function_call_arguments.done",
                    **ids,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        item["status"] = "completed"
        if item["type"] == "reasoning":
            del item["status"]
        out.append(
            self.event(
                "response.output_item.done", output_index=at, item=json.loads(json.dumps(item))
            )
        )
        return out

    def feed(self, events) -> list:
        out = []
        for e in events:
            at = len(self.response["output"]) - 1
            if isinstance(e, Reasoning):
                if self.item is None or self.item["type"] != "reasoning":
                    out += self._open(
                        {
                            "type": "reasoning",
                            "id": _item_id("rs"),
                            "summary": [],
                            "content": [],
                            "status": "in_progress",
                        }
                    )
                    at += 1
                self.item["content"][0]["text"] += e.text
                out.append(
                    self.event(
                        "response.reasoning_text.delta",
                        item_id=self.item["id"],
                        output_index=at,
                        content_index=0,
                        delta=e.text,
                    )
                )
            elif isinstance(e, Content):
                if self.item is None or self.item["type"] != "message":
                    out += self._open(
                        {
                            "type": "message",
                            "id": _item_id("msg"),
                            "status": "in_progress",
                            "role": "assistant",
                            "content": [],
                        }
                    )
                    at += 1
                self.item["content"][0]["text"] += e.text
                out.append(
                    self.event(
                        "response.output_text.delta",
                        item_id=self.item["id"],
                        output_index=at,
                        content_index=0,
                        delta=e.text,
                        logprobs=[],
                    )
                )
            elif isinstance(e, ToolStart):
                out += self._open(
                    {
                        "type": "function_call",
                        "id": _item_id("fc"),
                        "call_id": e.id,
                        "name": e.name,
                        "arguments": "",
                        "status": "in_progress",
                    }
                )
            elif isinstance(e, ToolArgs):
                self.item["arguments"] += e.text
                out.append(
                    self.event(
                        "response.function_call_arguments.delta",
                        item_id=self.item["id"],
                        output_index=at,
                        delta=e.text,
                    )
                )
            elif isinstance(e, ToolEnd):
                out += self._close()
            elif isinstance(e, Finish):
                out += self._close()
                out += self._finish(e)
        return out

    def _finish(self, finish: Finish) -> list:
        u, r = finish.usage, self.response
        r["usage"] = {
            "input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": finish.reasoning_tokens},
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            **({"drafts": u.drafts} if u.drafts else {}),
        }
        if finish.reason == "length":
            r["status"], r["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
        else:
            r["status"] = "completed"
        if self.request.options["store"] and self.meta.served.store is not None:
            self.meta.served.store.put(
                self.meta.id, self.snapshot(), self.request.options["history"] + [self._turn()]
            )
        return [self.event(f"response.{r['status']}", response=self.snapshot())]

    def _turn(self) -> dict:
        """This reply as the assistant message of the next turn (for previous_response_id)."""
        message = {"role": "assistant", "content": ""}
        for item in self.response["output"]:
            if item["type"] == "reasoning":
                message["reasoning_content"] = item["content"][0]["text"]
            elif item["type"] == "message":
                message["content"] += item["content"][0]["text"]
            else:
                message.setdefault("tool_calls", []).append(
                    {
                        "id": item["call_id"],
                        "type": "function",
                        "function": {
                            "name": item["name"],
                            "arguments": json.loads(item["arguments"]),
                        },
                    }
                )
        return message

    def fail(self, e: ApiError) -> list:
        self.response["status"] = "failed"
        # the codes the API defines
        code = "rate_limit_exceeded" if e.status == 429 else "server_error"
        self.response["error"] = {"code": code, "message": e.message}
        return [
            self.event("error", code=e.code, message=e.message, param=e.param),
            self.event("response.failed", response=self.snapshot()),
        ]

    def tail(self) -> list:
        return []


def whole(request: Request, events: list, meta) -> dict:
    builder = Stream(request, meta)
    builder.feed(events)
    return builder.snapshot()
