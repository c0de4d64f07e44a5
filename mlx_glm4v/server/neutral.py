"""What the dialects share: one request, one stream of reply events, `ApiError` and the
refusals that become one (`as_api_errors`), the checks of their fields (the model, numbers, media
parts, tools, settings), sealed reasoning, thinking effort.

A dialect (openai.py, responses.py, anthropic.py, ollama.py) parses its body into a `Request`
and renders the events below in its own wire format; run.py does everything in between once
(media, the processor, the engine, timeouts, disconnects, keep-alives, metrics). The reply events
come from the one parser of GLM's output (`reply.ReplyParser`): Reasoning, Content, ToolStart,
ToolArgs, ToolEnd; run.py adds Logprob (before a token's text) and Finish (last).
"""

import base64
import json
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import Glm4vError
from ..generation.chat import drop_thinking
from ..generation.reply import Content, Reasoning, ToolArgs, ToolEnd, ToolStart  # noqa: F401  (the events, re-exported)
from ..generation.settings import GenerationSettings
from .formats import FormatError

DEFAULT_MAX_TOKENS = 4096


class ApiError(Exception):
    """A request the server refuses: an HTTP status and one sentence; each dialect gives it its own
    shape (`body()` is OpenAI's, which chat completions and the Responses API share)."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "service_unavailable",
        504: "timeout",
    }

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param, code)


@contextmanager
def as_api_errors():
    """What the formats (a `FormatError`, which names its field) or the settings (any other
    `Glm4vError`) refuse, as the 400 every dialect sends."""
    try:
        yield
    except FormatError as e:
        raise bad(e.message, e.param) from None
    except Glm4vError as e:
        raise bad(str(e)) from None


DRAFTERS = ("mtp", "prompt_lookup", "none")


def draft_choice(body: dict) -> Optional[tuple]:
    """The request's extension fields `draft` ("mtp", "prompt_lookup" or "none") and
    `draft_steps` (drafts a verification pass): (kind, steps or None), or None when the request
    leaves it to the server (`serve --draft`)."""
    kind, steps = body.get("draft"), body.get("draft_steps")
    if kind is not None and kind not in DRAFTERS:
        raise bad(f"draft must be one of {', '.join(DRAFTERS)}.", "draft")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise bad("draft_steps must be a positive integer.", "draft_steps")
    if kind is None and steps is not None:
        raise bad("draft_steps needs draft: mtp or prompt_lookup.", "draft_steps")
    return None if kind is None else (kind, steps)


def check_settings(settings: dict):
    """A request's settings as `GenerationSettings` checks them (max_tokens None, what the context
    leaves, is checked as 1)."""
    with as_api_errors():
        GenerationSettings(**{**settings, "max_tokens": settings["max_tokens"] or 1})


@dataclass
class Request:
    """A checked request, the same for every dialect."""

    # the template's messages; media parts {"type": "image"|"video", "source", "detail", "param"},
    # documents {"type": "document", "source", "param", "pages", "dpi"} (each page an image)
    messages: list
    settings: dict  # GenerationSettings keyword arguments; max_tokens None: what the context leaves
    seed: Optional[int] = None
    stream: bool = False
    # [{"type": "function", "function": {name, description, parameters}}]
    tools: Optional[list] = None
    tool_choice: object = None
    template_kwargs: dict = field(default_factory=dict)  # e.g. enable_thinking
    top_logprobs: Optional[int] = None
    # the one place a structured-output constraint will be set (not yet: refused)
    constraint: object = None
    # the dialect's own reply options (include_usage, store, ...)
    options: dict = field(default_factory=dict)
    image_sizes: list = field(default_factory=list)  # (width, height) of each image, for `boxes`
    # seconds the model should stay loaded after this request (Ollama's keep_alive; -1: forever,
    # None: the server's default); the models registry obeys it (a pinned model stays)
    keep_alive: Optional[float] = None
    context: Optional[int] = None  # a smaller context than the model's (Ollama's num_ctx)
    # the request's media budget (vLLM's `mm_processor_kwargs`): max_pixels, min_pixels, fps,
    # max_frames, dpi; checked against the operator's caps where media are read (media.py)
    media_budget: dict = field(default_factory=dict)
    # (kind, steps) from the request's `draft` and `draft_steps` (draft_choice); None: the server's
    draft: Optional[tuple] = None


@dataclass
class Served:
    """What a dialect must know of the served model to check a request."""

    name: str
    names: set
    tools_supported: bool = False
    thinking_in_template: bool = False  # the template places earlier thinking (GLM-4.5V/4.6V)
    thinking_switch: bool = False  # the template takes enable_thinking
    answer_any_model: bool = False
    store: object = None  # the Responses store (responses.Store)


@dataclass
class Logprob:
    entry: dict  # OpenAI's logprob entry for one token


@dataclass
class Finish:
    reason: str  # "stop", "length", "tool_calls", "cancelled"
    usage: object  # engine.Usage
    stop_sequence: Optional[str] = None  # the stop string that ended the reply, if one did
    boxes: list = field(default_factory=list)
    reasoning_tokens: int = 0


@dataclass
class Meta:
    """One reply's identity: its id, creation time, the model's name and its prompt's size."""

    id: str
    created: int
    model: str
    prompt_tokens: int
    served: Served


@dataclass
class Reply:
    """A whole reply, gathered from its events."""

    reasoning: str = ""
    content: str = ""
    calls: list = field(default_factory=list)  # ToolEnd
    logprobs: list = field(default_factory=list)
    finish: Optional[Finish] = None


def gather(events) -> Reply:
    reply = Reply()
    for e in events:
        if isinstance(e, Reasoning):
            reply.reasoning += e.text
        elif isinstance(e, Content):
            reply.content += e.text
        elif isinstance(e, ToolEnd):
            reply.calls.append(e)
        elif isinstance(e, Logprob):
            reply.logprobs.append(e.entry)
        elif isinstance(e, Finish):
            reply.finish = e
    return reply


def check_model(model, served: Served, field_name: str = "model"):
    """The request's model: the served one (or any name, with --answer-any-model), else a 404."""
    if not isinstance(model, str) or not model:
        raise bad(f"{field_name} is required: the name of the model this server runs.", field_name)
    if model not in served.names and not served.answer_any_model:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server runs {served.name!r}.",
            field_name,
            "model_not_found",
        )


def number(body, key, lo=None, hi=None, integer=False, where=None):
    """body[key] checked as a number in [lo, hi] (None if absent)."""
    value = body.get(key)
    where = where or key
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise bad(f"{where} must be {kind}, not {json.dumps(value)[:40]}.", where)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad(
            f"{where} {value} is out of range [{lo}, {hi if hi is not None else 'inf'}].", where
        )
    return value


def check_fields(body, known: set, refused: dict, hints: Optional[dict] = None):
    """A dialect's body: a JSON object, every field known, none asking for what `refused` allows
    only in the values given (`hints` add a pointer to what to use instead)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object.")
    unknown_fields(body, known | set(refused))
    for key, allowed in refused.items():
        if body.get(key) is not None and body[key] not in allowed:
            raise bad(f"{key} is not supported by this server{(hints or {}).get(key, '')}.", key)


def unknown_fields(body: dict, known: set, where: str = ""):
    extra = sorted(set(body) - known)
    if extra:
        name = f"{where}.{extra[0]}" if where else extra[0]
        raise bad(f"unknown field {name!r}.", name)


def media_source(part: dict, key: str, where: str):
    """(url, detail) of an image_url / input_image / video_url part: an object with `url` or a
    bare string."""
    value = part.get(key)
    # Responses-style: {"type": "input_image", "image_url": "..."}
    if key == "input_image" and value is None:
        value = part.get("image_url")
    detail = part.get("detail")
    if isinstance(value, dict):
        detail = value.get("detail", detail)
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise bad(f"{where}: a {part.get('type')} part needs a url string.", where)
    if detail not in (None, "auto", "low", "high", "original"):
        raise bad(f"{where}: detail {detail!r} must be auto, low, high or original.", where)
    # high is the full size already
    return value, "high" if detail == "original" else detail or "auto"


MEDIA_BUDGET = "mm_processor_kwargs"  # vLLM's name for the request's media settings


def media_budget(body: dict) -> dict:
    """The request's `mm_processor_kwargs`, each value checked for its type and range (the
    operator's caps are media.py's to check)."""
    value = body.get(MEDIA_BUDGET)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"{MEDIA_BUDGET} must be an object.", MEDIA_BUDGET)
    unknown_fields(value, {"max_pixels", "min_pixels", "fps", "max_frames", "dpi"}, MEDIA_BUDGET)
    checks = {"max_pixels": (1, True), "min_pixels": (1, True), "max_frames": (2, True)}
    out = {}
    for key, (lo, integer) in checks.items():
        out[key] = number(value, key, lo, integer=integer, where=f"{MEDIA_BUDGET}.{key}")
    for key in ("fps", "dpi"):
        out[key] = number(value, key, where=f"{MEDIA_BUDGET}.{key}")
        if out[key] is not None and out[key] <= 0:
            raise bad(f"{MEDIA_BUDGET}.{key} {out[key]} must be positive.", f"{MEDIA_BUDGET}.{key}")
    return {k: v for k, v in out.items() if v is not None}


def document_part(source, where: str, part: dict) -> dict:
    """A document (a PDF) in the neutral form, with the page selection and DPI the part may
    carry (`pages`: "1-3,5", `dpi`)."""
    pages = part.get("pages")
    if pages is not None and (not isinstance(pages, str) or not pages.strip()):
        raise bad(f'{where}.pages must be a page selection string like "1-3,5".', where)
    dpi = number(part, "dpi", where=f"{where}.dpi")
    if dpi is not None and dpi <= 0:
        raise bad(f"{where}.dpi {dpi} must be positive.", f"{where}.dpi")
    return {"type": "document", "source": source, "param": where, "pages": pages, "dpi": dpi}


def pdf_data_url(data: str) -> str:
    """`file_data` as sent: a data: URL, or bare base64 (then taken for a PDF)."""
    return data if data.startswith("data:") else f"data:application/pdf;base64,{data}"


def function_tool(name, description, parameters, where: str) -> dict:
    """A tool in the one form the template renders (chat completions' form), whichever dialect
    sent it."""
    if not isinstance(name, str) or not name:
        raise bad(f"{where} needs a name.", where)
    if parameters is not None and not isinstance(parameters, dict):
        raise bad(f"{where}: the parameters schema must be an object.", where)
    fn = {"name": name}
    if description is not None:
        fn["description"] = description
    fn["parameters"] = (
        parameters if parameters is not None else {"type": "object", "properties": {}}
    )
    return {"type": "function", "function": fn}


def tool_calls(calls, where: str, arguments) -> list:
    """An assistant turn's tool calls in the template's form, from the dialects that send them
    as chat completions does; `arguments(value, at)` gives a call's arguments as an object (the
    dialects differ: a JSON string, or the object itself), or refuses them."""
    if not isinstance(calls, list):
        raise bad(f"{where} must be a list.", where)
    out = []
    for i, call in enumerate(calls):
        at = f"{where}[{i}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"{at} needs a function with a name.", at)
        function = {"name": fn["name"], "arguments": arguments(fn.get("arguments"), at)}
        out.append({"id": call.get("id"), "type": "function", "function": function})
    return out


def offered_tools(body, served: Served, one) -> tuple:
    """(tools in the template's form or None, tool_choice) of a dialect's body: `one(i, tool)` gives
    a tool's function form, or None for one left out (it cannot run here). A tool_choice other than
    auto or none is passed on: a constraint forces it (formats.py)."""
    tools, choice = body.get("tools") or [], body.get("tool_choice")
    if not isinstance(tools, list):
        raise bad("tools must be a list.", "tools")
    out = [t for t in (one(i, tool) for i, tool in enumerate(tools)) if t is not None]
    kind = choice.get("type") if isinstance(choice, dict) else choice
    if not out or kind == "none":
        return None, choice if kind not in (None, "auto", "none") else None
    if not served.tools_supported:
        raise bad(
            "tools are not supported: this model's chat template does not render them.", "tools"
        )
    return out, choice


def finish_messages(messages: list, served: Served) -> list:
    """Earlier thinking dropped where the template cannot place it (GLM-4.1V's keeps it as text)."""
    if served.thinking_in_template:
        return messages
    for m in messages:
        m.pop("reasoning_content", None)
        if m["role"] == "assistant" and isinstance(m["content"], str):
            m["content"] = drop_thinking(m["content"])
    return messages


# ---- sealed text: reasoning given out that only this server can read back ----------------------
# Responses' `encrypted_content` and Anthropic's thinking `signature`: AES-256-GCM (cryptography's
# AEAD) with a random 96-bit nonce. The key lives in the prompt cache directory when there is one
# (`use_key_in`), so a restarted server reads back what it gave out and an agent's conversation
# keeps its cached prefix; otherwise in this process only. What does not open (forged, altered,
# another server's, or sealed before the key changed) is dropped, as any foreign reasoning is.

KEY_FILE = "sealing.key"
_SEALED = b"mlx-glm4v sealed text 1"  # bound to every seal as associated data
_aead = AESGCM(AESGCM.generate_key(bit_length=256))


def use_key_in(directory) -> Path:
    """Seal with the key kept in `directory` (made, readable by its owner only, if missing)."""
    global _aead
    path = Path(directory) / KEY_FILE
    Path(directory).mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
    else:
        key = AESGCM.generate_key(bit_length=256)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
    if len(key) != 32:
        raise Glm4vError(f"{path} holds {len(key)} bytes, not a 32-byte sealing key.")
    _aead = AESGCM(key)
    return path


def seal(text: str) -> str:
    nonce = secrets.token_bytes(12)
    return base64.b64encode(nonce + _aead.encrypt(nonce, text.encode(), _SEALED)).decode()


def unseal(token) -> Optional[str]:
    """The text sealed in `token`, or None when it is not one of ours (forged, altered, or
    sealed with another key)."""
    try:
        raw = base64.b64decode(token, validate=True)
        return _aead.decrypt(raw[:12], raw[12:], _SEALED).decode("utf-8", "replace")
    except (ValueError, TypeError, InvalidTag):
        return None


# ---- thinking: how much, from each dialect's knob ------------------------------------------------
# Responses `reasoning.effort` and Anthropic `output_config.effort`: none -> no thinking (the
# template's switch where it has one, else a thinking budget of 0); minimal -> a budget of 256
# tokens; low -> 1024; medium, high, xhigh, max -> the model's own thinking (no budget).
EFFORT_BUDGETS = {
    "minimal": 256,
    "low": 1024,
    "medium": None,
    "high": None,
    "xhigh": None,
    "max": None,
}


def no_thinking(request: Request, served: Served):
    if served.thinking_switch:
        request.template_kwargs["enable_thinking"] = False
    else:
        request.settings["thinking_budget"] = 0


def effort(request: Request, served: Served, value, where: str):
    if value is None:
        return
    if value == "none":
        return no_thinking(request, served)
    if value not in EFFORT_BUDGETS:
        raise bad(f"{where} {value!r} must be one of none, {', '.join(EFFORT_BUDGETS)}.", where)
    if EFFORT_BUDGETS[value] is not None:
        request.settings["thinking_budget"] = EFFORT_BUDGETS[value]
