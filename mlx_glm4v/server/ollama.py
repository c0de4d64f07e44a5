"""Ollama's API (/api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version) <-> the
neutral request, for the clients that speak only Ollama (paperless-gpt, PhotoPrism, Karakeep,
Langflow, editor plugins, the `ollama` package).

Ollama's wire format: images as bare base64 strings beside a message's text, replies as NDJSON
lines (streamed unless `stream` is false), reasoning in `thinking`, tool calls whole with their
arguments as an object, `format` "json" or a JSON Schema (our structured-output constraint),
sampling in `options`, durations in nanoseconds on the last line, errors as {"error": "..."}.
Options that only place work on hardware (num_gpu, num_thread, ...) are accepted and ignored;
an option that would change the reply in a way we cannot honour, or one we do not know, is a
400 naming it. Sampling defaults are the server's own (as chat completions'), not llama.cpp's.
"""

import base64
import binascii
import hashlib
import json
import time
import uuid
from datetime import datetime, timedelta, timezone

from mlx.utils import tree_flatten

from ..serving.registry import duration
from .formats import ollama_format
from .neutral import (
    ApiError,
    Content,
    Finish,
    Logprob,
    Reasoning,
    Request,
    Served,
    ToolEnd,
    as_api_errors,
    bad,
    check_fields,
    check_model,
    check_settings,
    effort,
    finish_messages,
    function_tool,
    gather,
    no_thinking,
    number,
    tool_calls,
)

MEDIA_TYPE = "application/x-ndjson"
VERSION = "0.12.6"  # the Ollama release whose API this dialect follows (clients check it)
COMMON = {"model", "stream", "format", "options", "keep_alive", "think", "logprobs", "top_logprobs"}
CHAT = COMMON | {"messages", "tools"}
# generate's fields that ask for what we cannot do are refused unless empty
GENERATE = COMMON | {"prompt", "images", "system"}
GENERATE_REFUSED = {"suffix": ("",), "template": ("",), "context": ([],), "raw": (False,)}
# options -> (GenerationSettings keyword, kind, lo, hi)
OPTIONS = {
    "temperature": ("temp", float, 0, None),
    "top_p": ("top_p", float, 0, 1),
    "top_k": ("top_k", int, 0, None),
    "min_p": ("min_p", float, 0, 1),
    "repeat_penalty": ("repetition_penalty", float, 0, None),
    "repeat_last_n": ("repetition_context_size", int, 1, None),
    "num_predict": (None, int, None, None),
    "num_ctx": (None, int, 1, None),
    "seed": (None, int, None, None),
    "stop": (None, list, None, None),
}
# where the work runs, not what it computes
HARDWARE = {
    "numa",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "use_mmap",
    "use_mlock",
    "embedding_only",
    "num_thread",
    "num_keep",
}
# options that change the reply, accepted at the value that changes nothing
NEUTRAL = {
    "typical_p": 1.0,
    "tfs_z": 1.0,
    "mirostat": 0,
    "mirostat_tau": 5.0,
    "mirostat_eta": 0.1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "penalize_newline": False,
}
ROLES = ("system", "user", "assistant", "tool")


def error_body(e: ApiError) -> dict:
    return {"error": e.message}


def reply_id() -> str:
    return uuid.uuid4().hex


def now_iso(moment: datetime = None) -> str:
    return (moment or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---- the request -------------------------------------------------------------------------------


def keep_alive(value):
    """`keep_alive` in seconds (a number of seconds or a duration such as "5m" or "1h30m"; a
    negative one: forever, as -1), or None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad('keep_alive must be seconds or a duration such as "5m".', "keep_alive")
    try:
        return duration(value)
    except ValueError:
        raise bad(
            f'keep_alive {value!r} is not a duration such as "5m" or "1h30m".', "keep_alive"
        ) from None


def _images(images, where: str) -> list:
    """Ollama's images (bare base64) as the neutral image parts (data URLs)."""
    if images is None:
        return []
    if not isinstance(images, list):
        raise bad(f"{where} must be a list of base64 strings.", where)
    parts = []
    for i, image in enumerate(images):
        at = f"{where}[{i}]"
        if not isinstance(image, str) or not image:
            raise bad(f"{at} must be a base64 string.", at)
        try:
            base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"{at} is not valid base64.", at) from None
        source = f"data:application/octet-stream;base64,{image}"
        parts.append({"type": "image", "source": source, "detail": "auto", "param": at})
    return parts


def _user(text: str, parts: list):
    """A user turn's content: its text, with its images first (as the chat page sends them)."""
    if not parts:
        return text
    return parts + ([{"type": "text", "text": text}] if text else [])


def _arguments(value, at: str) -> dict:
    """A call's arguments: an object (Ollama sends them decoded)."""
    value = value or {}
    if not isinstance(value, dict):
        raise bad(f"{at}.function.arguments must be an object.", at)
    return value


def parse_messages(messages) -> list:
    if not isinstance(messages, list):
        raise bad("messages must be a list.", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object.", where)
        role, content = m.get("role"), m.get("content") or ""
        if role not in ROLES:
            raise bad(f"{where}.role {role!r} must be one of {', '.join(ROLES)}.", f"{where}.role")
        if not isinstance(content, str):
            raise bad(f"{where}.content must be a string.", f"{where}.content")
        if role == "user":
            out.append(
                {
                    "role": "user",
                    "content": _user(content, _images(m.get("images"), f"{where}.images")),
                }
            )
        elif role == "assistant":
            message = {"role": "assistant", "content": content}
            if isinstance(m.get("thinking"), str) and m["thinking"]:
                message["reasoning_content"] = m["thinking"]
            if m.get("tool_calls"):
                message["tool_calls"] = tool_calls(
                    m["tool_calls"], f"{where}.tool_calls", _arguments
                )
            out.append(message)
        else:
            if m.get("images"):
                raise bad(f"{where}: only a user message may hold images.", f"{where}.images")
            out.append({"role": role, "content": content})
    return out


def _tool(i: int, tool):
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or tool.get("type", "function") != "function":
        raise bad(
            f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}.',
            f"tools[{i}]",
        )
    return function_tool(fn.get("name"), fn.get("description"), fn.get("parameters"), f"tools[{i}]")


def _option(options: dict, key: str):
    """options[key] checked against its kind and range (None if absent)."""
    _, kind, lo, hi = OPTIONS[key]
    where, value = f"options.{key}", options.get(key)
    if value is None:
        return None
    if kind is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            raise bad(f"{where} must be a list of non-empty strings.", where)
        return value
    return number(options, key, lo, hi, integer=kind is int, where=where)


def _options(options) -> dict:
    """`options` checked: {our name or the option's: value} of those given."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise bad("options must be an object.", "options")
    for key, value in options.items():
        if key in OPTIONS or key in HARDWARE or value is None:
            continue
        if key not in NEUTRAL:
            raise bad(f"options.{key} is not an option this server knows.", f"options.{key}")
        if value != NEUTRAL[key]:
            raise bad(
                f"options.{key} is not supported by this server (only {NEUTRAL[key]}).",
                f"options.{key}",
            )
    return {key: v for key in OPTIONS if (v := _option(options, key)) is not None}


def _settings(options: dict, constraint) -> dict:
    predict = options.get("num_predict")
    if predict is not None and predict < 1 and predict not in (-1, -2):
        raise bad(
            "options.num_predict must be positive, -1 (no limit) or -2 (fill the context).",
            "options.num_predict",
        )
    settings = dict(
        max_tokens=predict if predict and predict > 0 else None,  # None: what the context leaves
        temp=1.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        stop=tuple(options.get("stop") or ()),
        constraint=constraint,
    )
    for key, (name, *_) in OPTIONS.items():
        if name and key in options:
            settings[name] = options[key]
    check_settings(settings)
    return settings


def _think(request: Request, served: Served, think):
    if think is None or think is True:
        return
    if think is False:
        return no_thinking(request, served)
    if think not in ("low", "medium", "high"):
        raise bad('think must be true, false, "low", "medium" or "high".', "think")
    effort(request, served, think, "think")


def _request(body, served: Served, messages: list, tools) -> Request:
    """What chat and generate share: the model, format, options, think, stream, keep_alive."""
    check_model(body.get("model"), served)
    with as_api_errors():
        constraint = ollama_format(body.get("format"))
    options = _options(body.get("options"))
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise bad("logprobs must be true or false.", "logprobs")
    top = number(body, "top_logprobs", 0, 20, integer=True)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream must be true or false.", "stream")
    request = Request(
        finish_messages(messages, served),
        _settings(options, constraint),
        seed=options.get("seed"),
        stream=stream is not False,  # Ollama streams unless told not to
        tools=tools,
        tool_choice=tools and "auto",
        constraint=constraint,
        top_logprobs=(top or 0) if logprobs else None,
        keep_alive=keep_alive(body.get("keep_alive")),
        context=options.get("num_ctx"),
        options={"started": time.perf_counter_ns(), "load": not messages},
    )
    _think(request, served, body.get("think"))
    return request


def parse(body, served: Served) -> Request:
    """POST /api/chat."""
    check_fields(body, CHAT, {})
    messages = parse_messages(body.get("messages") or [])
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise bad("tools must be a list.", "tools")
    tools = [_tool(i, t) for i, t in enumerate(tools)] or None
    if tools and not served.tools_supported:
        raise bad(
            "tools are not supported: this model's chat template does not render them.", "tools"
        )
    return _request(body, served, messages, tools)


def parse_generate(body, served: Served) -> Request:
    """POST /api/generate: a prompt (and images, a system text) as one user turn."""
    check_fields(body, GENERATE, GENERATE_REFUSED)
    prompt, system = body.get("prompt") or "", body.get("system") or ""
    if not isinstance(prompt, str) or not isinstance(system, str):
        raise bad("prompt and system must be strings.", "prompt")
    images = _images(body.get("images"), "images")
    messages = [{"role": "system", "content": system}] if system else []
    if prompt or images:
        messages.append({"role": "user", "content": _user(prompt, images)})
    elif messages:
        raise bad("a system text needs a prompt.", "prompt")
    request = _request(body, served, messages, None)
    request.options["generate"] = True
    return request


# ---- the reply ---------------------------------------------------------------------------------


def _durations(request: Request, finish: Finish) -> dict:
    total = time.perf_counter_ns() - request.options["started"]
    usage = finish.usage
    prompt = int(usage.time_to_first_token * 1e9)
    return {
        "total_duration": total,
        "load_duration": int(usage.queued * 1e9),
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": prompt,
        "eval_count": usage.completion_tokens,
        "eval_duration": max(0, total - prompt - int(usage.queued * 1e9)),
    }


def tool_call(call: ToolEnd) -> dict:
    return {
        "id": call.id,
        "function": {
            "index": call.index,
            "name": call.name,
            "arguments": json.loads(call.arguments),
        },
    }


def _logprob(entry: dict) -> dict:
    alternatives = [{"token": t["token"], "logprob": t["logprob"]} for t in entry["top_logprobs"]]
    return {"token": entry["token"], "logprob": entry["logprob"], "top_logprobs": alternatives}


class Stream:
    """Events -> Ollama's NDJSON lines (chat's `message` or generate's `response`); whole replies
    are one such line, gathered."""

    def __init__(self, request: Request, meta):
        self.request, self.meta = request, meta
        self.generate = request.options.get("generate", False)

    def line(self, content="", thinking="", calls=None, logprobs=None, **last) -> str:
        out = {"model": self.meta.model, "created_at": now_iso()}
        if self.generate:
            out["response"] = content
            if thinking:
                out["thinking"] = thinking
        else:
            message = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            out["message"] = message
        if logprobs:
            out["logprobs"] = logprobs
        out["done"] = bool(last)
        out.update(last)
        return json.dumps(out, ensure_ascii=False) + "\n"

    def head(self) -> list:
        return []

    def keepalive(self) -> str:
        return ""  # NDJSON has no comment line; a wait sends nothing

    def last(self, finish: Finish) -> dict:
        reason = "length" if finish.reason == "length" else "stop"
        return {"done_reason": reason, **_durations(self.request, finish)}

    def feed(self, events) -> list:
        out, logprobs = [], []
        for e in events:
            if isinstance(e, Logprob):
                logprobs.append(_logprob(e.entry))
            elif isinstance(e, Reasoning):
                out.append(self.line(thinking=e.text, logprobs=logprobs))
                logprobs = []
            elif isinstance(e, Content):
                out.append(self.line(e.text, logprobs=logprobs))
                logprobs = []
            elif isinstance(e, ToolEnd):
                out.append(self.line(calls=[tool_call(e)], logprobs=logprobs))
                logprobs = []
            elif isinstance(e, Finish):
                out.append(self.line(logprobs=logprobs, **self.last(e)))
                logprobs = []
        return out

    def fail(self, e: ApiError) -> list:
        return [json.dumps(error_body(e)) + "\n"]

    def tail(self) -> list:
        return []


def whole(request: Request, events: list, meta) -> dict:
    reply, stream = gather(events), Stream(request, meta)
    calls = [tool_call(c) for c in reply.calls]
    logprobs = [_logprob(e) for e in reply.logprobs]
    return json.loads(
        stream.line(reply.content, reply.reasoning, calls, logprobs, **stream.last(reply.finish))
    )


def loaded(request: Request, meta) -> dict:
    """The reply to a request with no messages (no prompt): Ollama's way to load a model."""
    stream = Stream(request, meta)
    return json.loads(stream.line(done_reason="load"))


# ---- the model's description: /api/tags, /api/show, /api/ps -----------------------------------


def details(model) -> dict:
    config = model.config
    bits = (config.quantization or {}).get("bits")
    return {
        "parent_model": "",
        "format": "safetensors",
        "family": config.model_type,
        "families": [config.model_type],
        "parameter_size": _size(parameter_count(model)),
        "quantization_level": f"Q{bits}" if bits else "F16",
    }


def parameter_count(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def weight_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _size(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def capabilities(served: Served, template: str) -> list:
    out = ["completion", "vision"]
    if served.tools_supported:
        out.append("tools")
    if served.thinking_switch or "<think>" in template or "</think>" in template:
        out.append("thinking")
    return out


def digest(name: str, model) -> str:
    """A stable identity of the served weights' shape and name (Ollama's is the blob's hash)."""
    config = json.dumps(model.config.text_config.__dict__, default=str, sort_keys=True)
    return hashlib.sha256(f"{name}:{config}".encode()).hexdigest()


def entry(name: str, model, started: datetime) -> dict:
    """One model as /api/tags lists it."""
    return {
        "name": name,
        "model": name,
        "modified_at": now_iso(started),
        "size": weight_bytes(model),
        "digest": digest(name, model),
        "details": details(model),
    }


def entry_on_disk(name: str, config: dict, size: int, started: datetime) -> dict:
    """A model not loaded, as /api/tags lists it: what its config.json and files say."""
    family = config.get("model_type", "")
    bits = (config.get("quantization") or {}).get("bits")
    return {
        "name": name,
        "model": name,
        "modified_at": now_iso(started),
        "size": size,
        "digest": hashlib.sha256(
            f"{name}:{json.dumps(config, sort_keys=True)}".encode()
        ).hexdigest(),
        "details": {
            "parent_model": "",
            "format": "safetensors",
            "family": family,
            "families": [family],
            "parameter_size": "",
            "quantization_level": f"Q{bits}" if bits else "F16",
        },
    }


def running(name: str, model, context: int, expires: datetime) -> dict:
    """One loaded model as /api/ps lists it (unified memory: all of it is the GPU's)."""
    size = weight_bytes(model)
    return {
        "name": name,
        "model": name,
        "size": size,
        "digest": digest(name, model),
        "details": details(model),
        "expires_at": now_iso(expires),
        "size_vram": size,
        "context_length": context,
    }


def show(name: str, model, processor, served: Served, started: datetime) -> dict:
    text = model.config.text_config
    arch = model.config.model_type
    return {
        "license": "",
        "modelfile": f"# served by mlx-glm4v\nFROM {name}\n",
        "parameters": "",
        "template": processor.chat_template,
        "details": details(model),
        "model_info": {
            "general.architecture": arch,
            "general.parameter_count": parameter_count(model),
            f"{arch}.context_length": text.max_position_embeddings,
            f"{arch}.embedding_length": text.hidden_size,
            f"{arch}.block_count": text.num_hidden_layers,
            f"{arch}.attention.head_count": text.num_attention_heads,
            f"{arch}.attention.head_count_kv": text.num_key_value_heads,
            f"{arch}.vocab_size": text.vocab_size,
        },
        "capabilities": capabilities(served, processor.chat_template),
        "modified_at": now_iso(started),
    }


def show_name(body) -> str:
    """POST /api/show's model (`model`, or the older `name`)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object.")
    return body.get("model") or body.get("name")


PINNED = timedelta(days=365 * 100)  # a pinned model's expiry as /api/ps shows it
