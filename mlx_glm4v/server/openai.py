"""OpenAI's chat-completions API: the request checked field by field, replies, errors, tool calls.

Strict on purpose: a field we do not implement is refused with a 400 that names it (a client
that asks for `n=2` or JSON mode must not get something else silently); only fields that
change nothing about the reply (`user`, `metadata`, ...) are accepted and ignored.
"""

import json
import re
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Optional

from ..errors import Glm4vError
from ..generate import GenerationSettings
from ..reply import ReplySplitter, split_reply

DEFAULT_MAX_TOKENS = 4096

# Fields we implement (the last four are extensions vLLM's and llama.cpp's servers take too).
SUPPORTED = {
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "seed", "stop", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "tools",
    "tool_choice", "n", "response_format",
    "top_k", "min_p", "repetition_penalty", "chat_template_kwargs", "thinking_budget", "ignore_eos",
}
# Fields that do not change the reply: accepted and ignored.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
           "prompt_cache_key"}
# Fields we cannot honour: accepted only when they ask for nothing (null, or the default shown).
REFUSED = {"logit_bias": ({},), "modalities": (["text"],), "audio": (), "prediction": (), "functions": (),
           "function_call": (), "reasoning_effort": (), "web_search_options": (), "verbosity": ()}
ROLES = ("system", "developer", "user", "assistant", "tool")
# Template arguments a client may not set through chat_template_kwargs.
RESERVED_TEMPLATE_ARGS = {"messages", "tools", "documents", "add_generation_prompt"}


class ApiError(Exception):
    """A request the server refuses: an HTTP status and one sentence, sent in OpenAI's error format."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
             503: "service_unavailable", 504: "timeout"}

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass
class ChatRequest:
    """A checked request: template messages (media still as references), settings and reply options."""

    messages: list  # our template's messages; media parts {"type": "image"|"video", "source": ..., "detail": ...}
    settings: dict  # GenerationSettings keyword arguments
    seed: Optional[int] = None
    stream: bool = False
    include_usage: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list] = None
    tool_choice: object = None
    template_kwargs: dict = field(default_factory=dict)
    image_sizes: list = field(default_factory=list)  # (width, height) of each image, for the reply's `boxes`


# ---- field checks ------------------------------------------------------------------------------

def _number(body, key, lo=None, hi=None, integer=False):
    value = body.get(key)
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise bad(f"{key} must be {kind}, not {json.dumps(value)[:40]}.", key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad(f"{key} {value} is out of range [{lo}, {hi if hi is not None else 'inf'}].", key)
    return value


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
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"{where} may hold text parts only, not {kind!r}.", where)
            if not isinstance(part.get("text"), str):
                raise bad(f"{where}: a text part needs a string `text`.", where)
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"{where} must be a string or a list of content parts.", where)


def _media_source(part: dict, key: str, where: str):
    """(url, detail) of an image_url / input_image / video_url part: an object with `url` or a bare string."""
    value = part.get(key)
    if key == "input_image" and value is None:  # Responses-style: {"type": "input_image", "image_url": "..."}
        value = part.get("image_url")
    detail = part.get("detail")
    if isinstance(value, dict):
        detail = value.get("detail", detail)
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise bad(f"{where}: a {part.get('type')} part needs a url string.", where)
    if detail not in (None, "auto", "low", "high"):
        raise bad(f"{where}: detail {detail!r} must be auto, low or high.", where)
    return value, detail or "auto"


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
            url, detail = _media_source(part, kind, at)
            parts.append({"type": "image", "source": url, "detail": detail, "param": at})
        elif kind == "video_url":
            url, _ = _media_source(part, kind, at)
            parts.append({"type": "video", "source": url, "param": at})
        else:
            raise bad(f"{at}: content part type {kind!r} is not supported (text, image_url, input_image, "
                      "video_url).", at)
    return parts


def _tool_calls(calls, where: str) -> list:
    if not isinstance(calls, list):
        raise bad(f"{where} must be a list.", where)
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"{where}[{i}] needs a function with a name.", f"{where}[{i}]")
        arguments = fn.get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise bad(f"{where}[{i}].function.arguments is not valid JSON.", f"{where}[{i}]") from None
        if not isinstance(arguments, dict):
            raise bad(f"{where}[{i}].function.arguments must be a JSON object.", f"{where}[{i}]")
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": arguments}})
    return out


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
            out.append({"role": "tool", "content": _text_of(content, f"{where}.content"),
                        **({"tool_call_id": m["tool_call_id"]} if m.get("tool_call_id") else {})})
        else:
            message = {"role": "assistant", "content": "" if content is None else _text_of(content, f"{where}.content")}
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            if isinstance(reasoning, str):
                message["reasoning_content"] = reasoning
            if m.get("tool_calls"):
                message["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
            out.append(message)
    return out


def _tools(body) -> tuple:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise bad("tool_choice needs tools.", "tool_choice")
        return None, None
    if not isinstance(tools, list):
        raise bad("tools must be a list.", "tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}.", f"tools[{i}]")
    if choice == "none":
        return None, None  # no tools offered, so none called
    if choice not in (None, "auto"):
        raise bad("tool_choice may be \"auto\" or \"none\": the model cannot be forced to call a tool.", "tool_choice")
    return tools, "auto"


def parse_chat(body, served: str, accepted: set, tools_supported: bool,
               template_handles_thinking: bool = True) -> ChatRequest:
    """Check a chat-completions body and turn it into a `ChatRequest`; an `ApiError` for the first problem.

    `served` is the model's name as clients see it; `accepted` the names a request may use for it.
    """
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object.")
    unknown = sorted(set(body) - SUPPORTED - IGNORED - set(REFUSED))
    if unknown:
        raise bad(f"unknown field {unknown[0]!r}.", unknown[0])
    for key, allowed in REFUSED.items():
        if body.get(key) is not None and body[key] not in allowed:
            hint = "; use tools" if key.startswith("function") else ""
            raise bad(f"{key} is not supported by this server{hint}.", key)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required: the name of the model this server runs.", "model")
    if model not in accepted:
        raise ApiError(404, f"the model {model!r} does not exist; this server runs {served!r}.",
                       "model", "model_not_found")
    if _number(body, "n", integer=True) not in (None, 1):
        raise bad(f"n={body['n']} is not supported: one choice per request.", "n")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        raise bad(f"response_format {kind!r} is not supported; only text.", "response_format")

    messages = parse_messages(body.get("messages"))
    if not template_handles_thinking:
        from ..chat import drop_thinking

        for m in messages:
            m.pop("reasoning_content", None)
            if m["role"] == "assistant":
                m["content"] = drop_thinking(m["content"])
    tools, tool_choice = _tools(body)
    if tools and not tools_supported:
        raise bad("tools are not supported: this model's chat template does not render them.", "tools")
    stream = bool(_bool(body, "stream"))
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise bad("stream_options is only allowed with stream: true, as an object.", "stream_options")
    include_usage = bool(options and options.get("include_usage"))

    max_tokens = _number(body, "max_completion_tokens", 1, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, integer=True)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop)):
        raise bad("stop must be a string or a list of at most 4 strings.", "stop")
    logprobs = _bool(body, "logprobs")
    top = _number(body, "top_logprobs", 0, 20, integer=True)
    if top is not None and not logprobs:
        raise bad("top_logprobs needs logprobs: true.", "top_logprobs")
    top_k = _number(body, "top_k", -1, integer=True)
    template_kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict) or RESERVED_TEMPLATE_ARGS & set(template_kwargs):
        raise bad("chat_template_kwargs must be an object and may not set messages, tools, documents or "
                  "add_generation_prompt.", "chat_template_kwargs")

    settings = dict(
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        temp=_number(body, "temperature", 0, 2) if body.get("temperature") is not None else 1.0,
        top_p=_number(body, "top_p", 0, 1) if body.get("top_p") is not None else 1.0,
        top_k=max(top_k or 0, 0),
        min_p=_number(body, "min_p", 0, 1) or 0.0,
        repetition_penalty=_number(body, "repetition_penalty", 0),
        stop=stop or (),
        ignore_eos=bool(_bool(body, "ignore_eos")),
    )
    supported = {f.name for f in fields(GenerationSettings)}
    for key, lo, hi in (("presence_penalty", -2, 2), ("frequency_penalty", -2, 2), ("thinking_budget", 0, None)):
        value = _number(body, key, lo, hi, integer=key == "thinking_budget")
        if value is None or (value == 0 and key != "thinking_budget"):
            continue
        if key not in supported:
            raise bad(f"{key} is not supported by this server.", key)
        settings[key] = value
    try:
        GenerationSettings(**settings)
    except Glm4vError as e:
        raise bad(str(e)) from None
    return ChatRequest(messages, settings, seed=_number(body, "seed", 0, 2**64 - 1, integer=True), stream=stream,
                       include_usage=include_usage, top_logprobs=(top or 0) if logprobs else None, tools=tools,
                       tool_choice=tool_choice, template_kwargs=dict(template_kwargs))


# ---- replies ------------------------------------------------------------------------------------

def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_body(usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def chunk(cid: str, created: int, model: str, delta: dict, finish_reason=None, logprobs=None) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def completion(cid: str, model: str, content: str, reasoning: str, tool_calls: list, finish_reason: str, usage,
               logprobs=None) -> dict:
    message = {"role": "assistant", "content": content if content or not tool_calls else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}],
            "usage": usage_body(usage)}


def logprob_entry(decode, token: int, logprob: float, alternatives) -> dict:
    def one(t, lp):
        text = decode(t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in alternatives or []]}


class Trim:
    """Streams text without its leading and trailing white space, as `str.strip` would cut the whole."""

    def __init__(self):
        self.started, self.pending = False, ""

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        if not text:
            return ""
        text = self.pending + text
        body = text.rstrip()
        self.pending = text[len(body):]
        return body


# ---- tool calls ---------------------------------------------------------------------------------

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


def _string_params(tools, name: str) -> set:
    for tool in tools or []:
        fn = tool.get("function", {})
        if fn.get("name") == name:
            props = (fn.get("parameters") or {}).get("properties") or {}
            return {k for k, v in props.items() if isinstance(v, dict) and v.get("type") == "string"}
    return set()


def parse_tool_call(body: str, tools=None) -> Optional[dict]:
    """One call from the text between <tool_call> and </tool_call>, in OpenAI's shape, or None.

    GLM-4.5V/4.6V write `name` then `<arg_key>k</arg_key><arg_value>v</arg_value>` pairs, values as
    JSON unless they are strings (the template writes strings raw); a string-typed parameter of the
    tool's schema stays a string. A JSON object {"name", "arguments"} is read too.
    """
    body = body.strip()
    if body.startswith("{"):
        try:
            call = json.loads(body)
            name, arguments = call["name"], call.get("arguments", call.get("parameters", {}))
        except (json.JSONDecodeError, KeyError, TypeError):
            return None
    else:
        name = body.split("<arg_key>", 1)[0].strip()
        strings = _string_params(tools, name)
        arguments = {}
        for key, value in _ARG.findall(body):
            key = key.strip()
            if key in strings:
                arguments[key] = value
                continue
            try:
                arguments[key] = json.loads(value)
            except json.JSONDecodeError:
                arguments[key] = value
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


class ToolCallStream:
    """Splits answer text as it streams into content and whole tool calls; a partial `<tool_call>` is held."""

    def __init__(self, tools):
        self.tools = tools
        self.pending, self.inside = "", False
        self.calls: list = []

    def feed(self, text: str) -> tuple:
        """(content to show, calls completed by this text)."""
        self.pending += text
        content, done = [], []
        while self.pending:
            if self.inside:
                end = self.pending.find(TOOL_CLOSE)
                if end < 0:
                    break
                call = parse_tool_call(self.pending[:end], self.tools)
                if call is None:  # not a call we can read: give the text back as it was
                    content.append(TOOL_OPEN + self.pending[:end + len(TOOL_CLOSE)])
                else:
                    done.append(call)
                self.pending, self.inside = self.pending[end + len(TOOL_CLOSE):], False
                continue
            at = self.pending.find(TOOL_OPEN)
            if at >= 0:
                content.append(self.pending[:at])
                self.pending, self.inside = self.pending[at + len(TOOL_OPEN):], True
                continue
            hold = max((k for k in range(1, len(TOOL_OPEN)) if self.pending.endswith(TOOL_OPEN[:k])), default=0)
            content.append(self.pending[:len(self.pending) - hold])
            self.pending = self.pending[len(self.pending) - hold:]
            break
        self.calls += done
        return "".join(content), done

    def finish(self) -> str:
        """Text still held (an unfinished call is shown as text)."""
        rest = (TOOL_OPEN if self.inside else "") + self.pending
        self.pending, self.inside = "", False
        return rest


def parse_tool_calls(text: str, tools=None) -> tuple:
    """(content, calls) of a whole answer."""
    stream = ToolCallStream(tools)
    content, _ = stream.feed(text)
    return content + stream.finish(), stream.calls


# ---- a reply, whole or streamed ------------------------------------------------------------------

def whole_reply(text: str, tools=None) -> tuple:
    """(content, reasoning, tool calls) of a whole reply."""
    parts = split_reply(text)
    if not tools:
        return parts.answer, parts.reasoning, []
    content, calls = parse_tool_calls(parts.answer, tools)
    return content.strip(), parts.reasoning, calls


class ReplyStream:
    """Streamed reply text -> OpenAI deltas that add up to `whole_reply`: the thinking as
    `reasoning_content`, the answer as `content` (markers removed, white space trimmed at both
    ends), each tool call whole as soon as its `</tool_call>` arrives."""

    def __init__(self, tools=None):
        self.splitter, self.thinking, self.answer = ReplySplitter(), Trim(), Trim()
        self.tools = ToolCallStream(tools) if tools else None
        self.calls = 0

    def feed(self, text: str, final: bool = False) -> list:
        out = self._deltas(*self.splitter.feed(text))
        if final:
            out += self._deltas(*self.splitter.finish(), final=True)
        return out

    def _deltas(self, reasoning: str, answer: str, final: bool = False) -> list:
        out, done = [], []
        if piece := self.thinking.feed(reasoning):
            out.append({"reasoning_content": piece})
        if self.tools is not None:
            answer, done = self.tools.feed(answer)
            if final:
                answer += self.tools.finish()
        if piece := self.answer.feed(answer):
            out.append({"content": piece})
        for call in done:
            out.append({"tool_calls": [{"index": self.calls, **call}]})
            self.calls += 1
        return out
