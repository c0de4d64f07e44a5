"""A reply's parts: the thinking and the answer, without GLM-V's markers.

GLM-4.1V writes `<think>…</think><answer>…</answer>`; GLM-4.5V/4.6V write `<think>…</think>`
and then the answer; all of them wrap grounding coordinates in `<|begin_of_box|>…<|end_of_box|>`.
The CLI, the Python API and the server split a reply the same way, here, streamed or whole
(`ReplySplitter`, `split_reply`); `ToolCalls` reads GLM's tool calls out of the answer as it
streams, and `ReplyParser` joins the two into the server's one stream of reply events.
"""

import json
import re
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Optional, Tuple

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# a thinking block, closed or still open
THINKING = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)
MARKERS = (THINK_OPEN, THINK_CLOSE, "<answer>", "</answer>", "<|begin_of_box|>", "<|end_of_box|>")


@dataclass
class ReplyParts:
    reasoning: str  # the text inside <think>…</think> (up to the end if never closed)
    answer: str  # everything else, markers removed


class ReplySplitter:
    """Splits streamed text into (reasoning, answer) pieces as it arrives.

    A marker may arrive split over pieces, so text that could be the start of one is held back
    until the next piece (or `finish`) tells.
    """

    def __init__(self):
        self.thinking = False
        self.pending = ""

    def feed(self, text: str) -> Tuple[str, str]:
        self.pending += text
        reasoning, answer = [], []
        while self.pending:
            at = self.pending.find("<")
            plain = self.pending if at < 0 else self.pending[:at]
            (reasoning if self.thinking else answer).append(plain)
            self.pending = "" if at < 0 else self.pending[at:]
            if not self.pending:
                break
            marker = next((m for m in MARKERS if self.pending.startswith(m)), None)
            if marker:
                self.pending = self.pending[len(marker) :]
                if marker in (THINK_OPEN, THINK_CLOSE):
                    self.thinking = marker == THINK_OPEN
            elif any(m.startswith(self.pending) for m in MARKERS):
                break  # maybe the start of a marker: wait for more text
            else:
                (reasoning if self.thinking else answer).append("<")
                self.pending = self.pending[1:]
        return "".join(reasoning), "".join(answer)

    def finish(self) -> Tuple[str, str]:
        """What is still held back, as it stands."""
        rest, self.pending = self.pending, ""
        return (rest, "") if self.thinking else ("", rest)


def split_reply(text: str) -> ReplyParts:
    """A whole reply as its thinking and its answer, each stripped of surrounding white space."""
    splitter = ReplySplitter()
    parts = [splitter.feed(text), splitter.finish()]
    return ReplyParts("".join(p[0] for p in parts).strip(), "".join(p[1] for p in parts).strip())


# ---- the one streaming parser: thinking, answer and tool calls as events -------------------------


@dataclass
class Reasoning:
    text: str


@dataclass
class Content:
    text: str


@dataclass
class ToolStart:
    index: int
    id: str
    name: str


@dataclass
class ToolArgs:
    index: int
    text: str  # a fragment of the call's `arguments` JSON; the fragments add up to exactly it


@dataclass
class ToolEnd:
    index: int
    id: str
    name: str
    arguments: str  # the whole arguments JSON (a JSON object)


class Trim:
    """Streams text without its leading and trailing white space, as `str.strip` would cut the
    whole."""

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
        self.pending = text[len(body) :]
        return body


TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
KEY_OPEN, KEY_CLOSE, VALUE_OPEN, VALUE_CLOSE = (
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def string_params(tools, name: str) -> set:
    """The parameters of tool `name` whose schema says string: GLM writes their values raw."""
    for tool in tools or []:
        fn = tool.get("function", tool)
        if fn.get("name") == name:
            props = (fn.get("parameters") or {}).get("properties") or {}
            return {
                k
                for k, v in props.items()
                if isinstance(v, dict)
                and (
                    v.get("type") == "string"
                    or (isinstance(v.get("type"), list) and "string" in v["type"])
                )
            }
    return set()


def _next(text: str, markers) -> tuple:
    """(at, marker) of the first marker in `text`; else (n, None) where text[:n] cannot begin
    one."""
    found = [(text.find(m), m) for m in markers if m in text]
    if found:
        return min(found)
    hold = max((k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)
    return len(text) - hold, None


def _json_call(text: str) -> Optional[tuple]:
    """(name, arguments) of a call written as a JSON object {"name", "arguments"}; None if it is
    not one."""
    try:
        call = json.loads(text)
        name, arguments = call["name"], call.get("arguments", call.get("parameters", {}))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return name, arguments


class State(Enum):
    """Where `ToolCalls` stands in the answer text."""

    TEXT = "text"  # plain text, up to a <tool_call>
    HEAD = "head"  # after <tool_call>: the name line, or a JSON call
    JSON = "json"  # a JSON call, up to </tool_call>
    ARGS = "args"  # between arguments: <arg_key> or </tool_call>
    KEY = "key"  # an argument's name, up to </arg_key>
    AFTER_KEY = "after_key"  # after </arg_key>: <arg_value> (or <arg_key>, </tool_call>)
    VALUE = "value"  # an argument's value, up to </arg_value>


class ToolCalls:
    """Answer text -> plain text pieces (str) and tool-call events, as the text streams in.

    GLM-4.5V/4.6V write `<tool_call>name` then `<arg_key>k</arg_key><arg_value>v</arg_value>` pairs,
    values as JSON unless they are strings (the template writes strings raw). The call starts as
    soon as its name line is complete; a string parameter of the tool's schema streams as an
    escaped JSON string, any other value is read whole (JSON if it parses, else a string). A JSON
    object {"name", "arguments"} is read too, whole. Text that cannot be a call stays text.
    """

    def __init__(self, tools, new_id=call_id):
        self.tools, self.new_id = tools, new_id
        self.state, self.pending = State.TEXT, ""
        self.count = 0  # calls started so far; the next one's index
        self.call = None  # the call being read: {"index", "id", "name", "args": [JSON pieces]}
        self.strings = set()  # its string parameters (streamed raw)
        self.key = None  # the argument whose value is being read
        # that value: None while it streams as a JSON string, else the text gathered to parse whole
        self.value = None

    def feed(self, text: str, final: bool = False) -> list:
        """Text pieces and call events for `text` (and, when `final`, for all still held)."""
        self.pending += text
        out = []
        while self._READERS[self.state](self, out):
            pass
        if final:
            out += self._finish()
        return [x for x in out if x != ""]

    # ---- the states' readers: each takes what it can of `pending` into `out` and says whether
    # to go on (False: it waits for more text)

    def _read_text(self, out: list) -> bool:
        p = self.pending
        at, marker = _next(p, [TOOL_OPEN])
        out.append(p[:at])
        if marker is None:
            self.pending = p[at:]
            return False
        self.pending, self.state = p[at + len(TOOL_OPEN) :], State.HEAD
        return True

    def _read_head(self, out: list) -> bool:
        p = self.pending
        body = p.lstrip()
        if body.startswith("{"):
            self.state = State.JSON
            return True
        ends = [i for i in (p.find("\n", len(p) - len(body)), p.find("<")) if i >= 0]
        if not ends:
            return False
        name = p[: min(ends)].strip()
        if not name:
            out.append(TOOL_OPEN)
            self.state = State.TEXT
            return True
        out.extend(self._start(name))
        self.pending, self.state = p[min(ends) :], State.ARGS
        return True

    def _read_json(self, out: list) -> bool:
        p = self.pending
        at = p.find(TOOL_CLOSE)
        if at < 0:
            return False
        self.pending, self.state = p[at + len(TOOL_CLOSE) :], State.TEXT
        call = _json_call(p[:at])
        if call is None:  # not a call we can read: text as it was
            out.append(TOOL_OPEN + p[: at + len(TOOL_CLOSE)])
            return True
        name, arguments = call
        out.extend(self._start(name))
        out.extend(self._args(json.dumps(arguments, ensure_ascii=False)[1:-1]))
        out.extend(self._end())
        return True

    def _read_tags(self, out: list) -> bool:
        """ARGS and AFTER_KEY: the next tag; text between the tags means nothing."""
        markers = [KEY_OPEN, TOOL_CLOSE] + ([VALUE_OPEN] if self.state is State.AFTER_KEY else [])
        at, marker = _next(self.pending, markers)
        if marker is None:
            self.pending = self.pending[at:]
            return False
        self.pending = self.pending[at + len(marker) :]
        if marker == TOOL_CLOSE:
            out.extend(self._end())
            self.state = State.TEXT
        elif marker == KEY_OPEN:
            self.state = State.KEY
        else:
            out.extend(self._open_value())
        return True

    def _read_key(self, out: list) -> bool:
        at = self.pending.find(KEY_CLOSE)
        if at < 0:
            return False
        self.key = self.pending[:at].strip()
        self.pending, self.state = self.pending[at + len(KEY_CLOSE) :], State.AFTER_KEY
        return True

    def _read_value(self, out: list) -> bool:
        at, marker = _next(self.pending, [VALUE_CLOSE])
        piece, self.pending = self.pending[:at], self.pending[at + len(marker or "") :]
        out.extend(self._value_piece(piece))
        if marker is None:
            return False
        out.extend(self._close_value())
        self.state = State.ARGS
        return True

    _READERS = {
        State.TEXT: _read_text,
        State.HEAD: _read_head,
        State.JSON: _read_json,
        State.ARGS: _read_tags,
        State.AFTER_KEY: _read_tags,
        State.KEY: _read_key,
        State.VALUE: _read_value,
    }

    # ---- the call's arguments JSON, piece by piece

    def _start(self, name: str) -> list:
        self.call = {"index": self.count, "id": self.new_id(), "name": name, "args": ["{"]}
        self.strings, self.key, self.value = string_params(self.tools, name), None, None
        self.count += 1
        return [
            ToolStart(self.call["index"], self.call["id"], name),
            ToolArgs(self.call["index"], "{"),
        ]

    def _args(self, text: str) -> list:
        if not text:
            return []
        self.call["args"].append(text)
        return [ToolArgs(self.call["index"], text)]

    def _json_key(self) -> str:
        """The argument's key as the arguments JSON writes it, after a comma unless it is the
        first."""
        sep = ", " if len(self.call["args"]) > 1 else ""
        return f"{sep}{json.dumps(self.key, ensure_ascii=False)}: "

    def _open_value(self) -> list:
        """A string parameter's value opens its JSON string now; any other is gathered."""
        self.state = State.VALUE
        if self.key in self.strings:
            self.value = None
            return self._args(self._json_key() + '"')
        self.value = ""
        return []

    def _value_piece(self, piece: str) -> list:
        if self.value is None:
            return self._args(json.dumps(piece, ensure_ascii=False)[1:-1])
        self.value += piece
        return []

    def _close_value(self) -> list:
        if self.value is None:  # a string, already streamed
            return self._args('"')
        try:
            value = json.dumps(json.loads(self.value), ensure_ascii=False)
        except json.JSONDecodeError:
            value = json.dumps(self.value, ensure_ascii=False)
        return self._args(self._json_key() + value)

    def _end(self) -> list:
        out = self._args("}")
        c = self.call
        return out + [ToolEnd(c["index"], c["id"], c["name"], "".join(c["args"]))]

    def _finish(self) -> list:
        """What is still held: a call not begun is text again; a begun one is closed as it
        stands."""
        p, state = self.pending, self.state
        self.pending, self.state = "", State.TEXT
        if state is State.TEXT:
            return [p]
        if state in (State.HEAD, State.JSON):
            return [TOOL_OPEN + p]
        out = []
        if state is State.VALUE:
            out += self._value_piece(p)
            out += self._close_value()
        return out + self._end()


class ReplyParser:
    """GLM-V reply text, streamed -> events: Reasoning, Content, ToolStart, ToolArgs, ToolEnd.

    The thinking and the answer lose their markers and the white space at both ends (as
    `split_reply`); tool calls are read from the answer only when the request offered tools.
    Fed the whole text at once it gives what the pieces give: one parser for whole and streamed.
    """

    def __init__(self, tools=None, new_id=call_id):
        self.splitter, self.thinking, self.answer = ReplySplitter(), Trim(), Trim()
        self.tools = ToolCalls(tools, new_id) if tools else None

    @property
    def calls(self) -> int:
        return self.tools.count if self.tools else 0

    def feed(self, text: str) -> list:
        return self._events(*self.splitter.feed(text))

    def finish(self) -> list:
        return self._events(*self.splitter.finish(), final=True)

    def _events(self, reasoning: str, answer: str, final: bool = False) -> list:
        out = []
        if piece := self.thinking.feed(reasoning):
            out.append(Reasoning(piece))
        pieces = self.tools.feed(answer, final) if self.tools else [answer]
        for item in pieces:
            if not isinstance(item, str):
                out.append(item)
            elif piece := self.answer.feed(item):
                out.append(Content(piece))
        return out


@dataclass
class ParsedReply:
    reasoning: str
    content: str
    calls: list  # ToolEnd per call


def parse_reply(text: str, tools=None) -> ParsedReply:
    """A whole reply's thinking, answer and tool calls (the streamed events, gathered)."""
    parser = ReplyParser(tools)
    events = parser.feed(text) + parser.finish()
    return ParsedReply(
        "".join(e.text for e in events if isinstance(e, Reasoning)),
        "".join(e.text for e in events if isinstance(e, Content)),
        [e for e in events if isinstance(e, ToolEnd)],
    )
