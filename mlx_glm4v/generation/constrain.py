"""Structured output: the answer decoded under a grammar (llguidance), the thinking left free.

A `Constraint` (JSON Schema, any JSON object, regex, Lark grammar, a choice of strings, or a
forced GLM tool call) travels in `GenerationSettings`. Each constrained reply gets a
`RowGrammar`: an llguidance matcher that sleeps while the model thinks and wakes after
`</think>` (generated, forced by the thinking budget, or already in the prompt), then masks
every token the grammar does not allow. GLM-4.1V's `<answer>` ... `</answer>` may wrap the
constrained text. The llguidance tokenizer is built once per processor and logits width from
the checkpoint's tokenizer.json; the masks of a step's constrained rows are filled into one
numpy bitmask and applied with plain `mx` ops, so they work on every MLX backend.
"""

import json
import re
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..errors import Glm4vError

KINDS = ("json_schema", "json_object", "regex", "lark", "choice", "tool_call")
MAX_SPEC_BYTES = 256 * 1024  # a schema, grammar or tool list larger than this is refused
# compact JSON: a model unsure what comes next cannot pad with white space until the token limit
JSON_OPTIONS = {"whitespace_flexible": False}
# spec key -> validated grammar, most recent last
_COMPILED: "OrderedDict[str, str]" = OrderedDict()
_COMPILED_MAX = 256
_COMPILED_LOCK = threading.Lock()


def _limits():
    """llguidance's resource bounds, tighter than its defaults where a request could make it work
    long."""
    from llguidance import LLParserLimits

    return LLParserLimits(
        max_grammar_size=200_000,
        initial_lexer_fuel=1_000_000,
        step_lexer_fuel=200_000,
        max_lexer_states=100_000,
        verbose_errors=False,
    )


@dataclass(frozen=True, eq=False)
class Constraint:
    """What the answer must match.

    kind: "json_schema" (spec: the schema, a dict), "json_object" (any JSON object), "regex"
    (spec: the pattern, matched whole), "lark" (spec: an llguidance Lark grammar), "choice"
    (spec: the strings allowed) or "tool_call" (spec: OpenAI-style tools, `name` the one to
    call or None for any: the answer is one GLM tool call with arguments valid for its schema).
    """

    kind: str
    spec: Any = None
    name: Optional[str] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise Glm4vError(
                f"constraint kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}."
            )
        expect = {
            "json_schema": dict,
            "regex": str,
            "lark": str,
            "choice": list,
            "tool_call": list,
        }.get(self.kind)
        if expect is not None and not isinstance(self.spec, expect):
            raise Glm4vError(
                f"a {self.kind} constraint needs a {expect.__name__}, not "
                f"{type(self.spec).__name__}."
            )
        if self.kind == "choice" and (
            not self.spec or not all(isinstance(c, str) and c for c in self.spec)
        ):
            raise Glm4vError("a choice constraint needs a non-empty list of non-empty strings.")

    def key(self) -> str:
        return json.dumps([self.kind, self.spec, self.name], sort_keys=True, ensure_ascii=False)

    @property
    def grammar(self) -> str:
        """The llguidance grammar of the answer, checked; compiled once per distinct constraint.
        A `Glm4vError` names what cannot be compiled."""
        return self.compiled(answer_tags=False)

    def compiled(self, answer_tags: bool) -> str:
        """The grammar, with GLM-4.1V's `<answer>` ... `</answer>` allowed around it if
        `answer_tags`."""
        key = json.dumps([answer_tags, self.key()])
        with _COMPILED_LOCK:  # the server's parsers and the engine's thread share it
            if key in _COMPILED:
                _COMPILED.move_to_end(key)
                return _COMPILED[key]
        if len(key) > MAX_SPEC_BYTES:
            raise Glm4vError(
                f"the {self.kind} constraint is {len(key)} bytes; "
                f"at most {MAX_SPEC_BYTES} are accepted."
            )
        grammar = _compile(self, answer_tags)
        with _COMPILED_LOCK:
            _COMPILED[key] = grammar
            if len(_COMPILED) > _COMPILED_MAX:
                _COMPILED.popitem(last=False)
        return grammar


def compile_seconds(constraint: Constraint) -> float:
    """Seconds to compile and check a constraint's grammar from scratch (for the benchmark)."""
    with _COMPILED_LOCK:
        _COMPILED.pop(json.dumps([False, constraint.key()]), None)
    start = time.perf_counter()
    _ = constraint.grammar  # the property compiles and checks it
    return time.perf_counter() - start


# RFC 3339 full-date with the calendar's days (llguidance's `date` format lets February 29th through
# in any year)
_LEAP = r"([0-9]{2}(0[48]|[2468][048]|[13579][26])|([02468][048]|[13579][26])00)-02-29"
DATE = (
    r"^(?:[0-9]{4}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
    r"|02-(0[1-9]|1[0-9]|2[0-8]))|" + _LEAP + ")$"
)


def exact_dates(schema):
    """The schema with each `"format": "date"` (on a string without a pattern of its own) as a
    pattern that knows the calendar."""
    if isinstance(schema, list):
        return [exact_dates(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: exact_dates(v) if k not in ("const", "enum", "default", "examples") else v
        for k, v in schema.items()
    }
    if out.get("format") == "date" and "pattern" not in out:
        del out["format"]
        out["pattern"] = DATE
    return out


def _body(constraint: Constraint) -> str:
    from llguidance import LLMatcher

    kind, spec = constraint.kind, constraint.spec
    if kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(exact_dates(spec), defaults=JSON_OPTIONS)
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec)
    if kind == "lark":
        return LLMatcher.grammar_from_lark(spec)
    if kind == "choice":
        return LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec)
        )
    return LLMatcher.grammar_from_lark(tool_call_lark(spec, constraint.name))


def _compile(constraint: Constraint, answer_tags: bool) -> str:
    """The answer's grammar as a sub-grammar `body`, optionally inside `<answer>` ...
    `</answer>`."""
    from llguidance import LLMatcher

    try:
        body = _body(constraint)
    except ValueError as e:
        raise Glm4vError(f"the {constraint.kind} constraint cannot be read: {e}") from None
    grammars = (
        json.loads(body)["grammars"] if body.lstrip().startswith("{") else [{"lark_grammar": body}]
    )
    grammars[0]["name"] = "body"
    top = "start: @body | <answer> @body </answer>" if answer_tags else "start: @body"
    grammar = json.dumps({"grammars": [{"lark_grammar": top}] + grammars})
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, None, limits=_limits())
    if failed:
        raise Glm4vError(_explain(constraint.kind, messages[0]))
    return grammar


def _explain(kind: str, message: str) -> str:
    """llguidance's error as one sentence naming the keyword it does not support."""
    lines = [line.strip() for line in message.strip().splitlines()] or ["unknown error"]
    detail = next(
        (line[len("error:") :].strip() for line in lines if line.startswith("error:")), None
    )
    message = f"{lines[0].rstrip(':')}: {detail}" if detail else lines[0]
    unsupported = re.search(r"Unimplemented keys: \[(.*?)\]", message)
    if unsupported:
        keys = ", ".join(k.strip().strip('"') for k in unsupported.group(1).split(","))
        return f"the JSON schema uses {keys}, which structured output does not support."
    what = {
        "json_schema": "JSON schema",
        "json_object": "JSON object",
        "regex": "regex",
        "lark": "Lark grammar",
        "choice": "choice",
        "tool_call": "tool's parameter schema",
    }[kind]
    return f"the {what} cannot be compiled: {message.rstrip('.')}."


# ---- forced tool calls --------------------------------------------------------------------------

_FORMATS = {  # string formats a raw tool argument (no JSON quotes) is held to
    "date": DATE[1:-1],
    "time": r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})?",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+",
}


def _function(tool: dict) -> dict:
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise Glm4vError("a forced tool call needs tools with a name each.")
    return fn


def _raw_string(schema: dict, where: str) -> str:
    """A Lark item for a string argument as GLM writes it: raw text, no quotes."""
    from llguidance import regex_to_lark

    if "enum" in schema or "const" in schema:
        values = schema.get("enum", [schema.get("const")])
        if not all(isinstance(v, str) for v in values):
            raise Glm4vError(f"{where}: enum values of a string parameter must be strings.")
        return "(" + " | ".join(json.dumps(v, ensure_ascii=False) for v in values) + ")"
    if "pattern" in schema:
        pattern = schema["pattern"]
        pattern = pattern[1:] if pattern.startswith("^") else ".*" + pattern
        pattern = (
            pattern[:-1]
            if pattern.endswith("$") and not pattern.endswith("\\$")
            else pattern + ".*"
        )
        return "/" + regex_to_lark(pattern, "dw") + "/"
    if "format" in schema:
        if schema["format"] not in _FORMATS:
            raise Glm4vError(
                f"{where}: string format {schema['format']!r} is not supported in a forced tool "
                "call."
            )
        return "/" + _FORMATS[schema["format"]] + "/"
    lo, hi = int(schema.get("minLength", 0)), schema.get("maxLength")
    return "/(?s:.{%d,%s})/" % (lo, "" if hi is None else int(hi))


def tool_call_lark(tools: Sequence, name: Optional[str]) -> str:
    """A Lark grammar of one GLM tool call: `<tool_call>NAME\\n` then
    `<arg_key>k</arg_key>\\n<arg_value>v </arg_value>\\n` per argument (required ones always, the
    others optional, in the schema's order) and `</tool_call>`; string values raw, the others
    JSON, as the template writes and the server reads them."""
    functions = [_function(t) for t in tools]
    if not functions:
        raise Glm4vError("a forced tool call needs at least one tool.")
    if name is not None:
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise Glm4vError(f"the tool {name!r} to call is not among the tools given.")
    rules, calls = [], []
    for i, fn in enumerate(functions):
        params = fn.get("parameters") or {}
        if not isinstance(params, dict):
            raise Glm4vError(f"the parameters of tool {fn['name']!r} must be a JSON schema object.")
        defs = {k: params[k] for k in ("$defs", "definitions") if k in params}
        props, required = params.get("properties") or {}, set(params.get("required") or [])
        missing = required - set(props)
        if missing:
            raise Glm4vError(
                f"tool {fn['name']!r} requires {sorted(missing)[0]!r}, which its properties do "
                "not define."
            )
        items = []
        for j, (key, schema) in enumerate(props.items()):
            where = f"tool {fn['name']!r} parameter {key!r}"
            schema = schema if isinstance(schema, dict) else {}
            if schema.get("type") == "string":
                value = _raw_string(schema, where)
            else:
                value = "%json " + json.dumps(
                    {**schema, **defs, "x-guidance": JSON_OPTIONS}, ensure_ascii=False
                )
            rules.append(
                f'arg_{i}_{j}: <arg_key> {json.dumps(key, ensure_ascii=False)} </arg_key> "\\n" '
                f'<arg_value> {value} </arg_value> "\\n"'
            )
            items.append(f"arg_{i}_{j}" + ("" if key in required else "?"))
        rules.append(
            f"call_{i}: {json.dumps(fn['name'] + chr(10), ensure_ascii=False)} {' '.join(items)}"
        )
        calls.append(f"call_{i}")
    return "\n".join([f"start: <tool_call> ({' | '.join(calls)}) </tool_call>"] + rules)


# ---- matching, per row --------------------------------------------------------------------------

# processor -> {(width, ends): LLTokenizer}
_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_EXECUTOR = None


def grammar_tokenizer(processor, n_vocab: int, end_ids: Sequence[int]):
    """llguidance's tokenizer from the checkpoint's tokenizer.json, built once per processor and
    logits width."""
    from llguidance import LLTokenizer

    built = _TOKENIZERS.setdefault(processor, {})
    key = (n_vocab, tuple(sorted(end_ids)))
    if key not in built:
        built[key] = LLTokenizer(
            processor.tokenizer.backend.to_str(), n_vocab=n_vocab, eos_token=list(key[1])
        )
    return built[key]


def _executor():
    global _EXECUTOR
    if _EXECUTOR is None:
        from llguidance import LLExecutor

        _EXECUTOR = LLExecutor()
    return _EXECUTOR


OPEN, THINKING, ANSWER = "open", "thinking", "answer"


class RowGrammar:
    """One reply's matcher and where the reply stands: maybe about to think (`open`), thinking,
    or answering.

    While thinking nothing but the end tokens is masked (a reply must not end before its answer);
    in `open` the first token may also be `<think>`. Tokens go to the matcher from the answer on.
    """

    def __init__(self, constraint: Constraint, processor, n_vocab: int, end_ids: Sequence[int]):
        from llguidance import LLMatcher

        self.constraint = constraint
        self.n_vocab = n_vocab
        self.end_ids = sorted(end_ids)
        tokenizer = grammar_tokenizer(processor, n_vocab, end_ids)
        ids = processor.convert_tokens_to_ids
        tags = ids("<answer>") is not None and ids("</answer>") is not None
        self.matcher = LLMatcher(tokenizer, constraint.compiled(answer_tags=tags), limits=_limits())
        if self.matcher.is_error():
            raise Glm4vError(_explain(constraint.kind, self.matcher.get_error()))
        self.think_open, self.think_close = ids("<think>"), ids("</think>")
        self.assistant = ids("<|assistant|>")
        self.phase = ANSWER
        self.prompt_length = 0
        self.fed = 0  # reply tokens seen

    def start(self, prompt_ids):
        """Read where the prompt leaves the reply: thinking opened, closed, or not begun."""
        ids = np.asarray(prompt_ids).reshape(-1)
        self.prompt_length, self.fed = len(ids), 0
        if self.think_open is None or self.think_close is None:
            self.phase = ANSWER
            return self
        turn = np.flatnonzero(ids == self.assistant) if self.assistant is not None else np.array([])
        tail = ids[int(turn[-1]) + 1 :] if turn.size else ids
        opened = np.flatnonzero(tail == self.think_open)
        closed = np.flatnonzero(tail == self.think_close)
        if opened.size and (not closed.size or closed[-1] < opened[-1]):
            self.phase = THINKING
        elif closed.size:
            self.phase = ANSWER
        else:
            self.phase = OPEN
        return self

    def feed(self, token: int):
        """A token of the reply, sampled under this row's last mask."""
        self.fed += 1
        if self.phase == THINKING:
            if token == self.think_close:
                self.phase = ANSWER
            return
        if self.phase == OPEN:
            self.phase = ANSWER
            if token == self.think_open:
                self.phase = THINKING
                return
        if token in self.end_ids and self.matcher.is_accepting():
            return
        if not self.matcher.consume_token(token):
            raise Glm4vError(
                "structured output went wrong: "
                f"{self.matcher.get_error() or 'a token the grammar refuses'}."
            )

    def sync(self, history: mx.array):
        """Feed the reply tokens in `history` (prompt and reply, as logits processors see it) not
        yet fed."""
        new = history.reshape(-1)[self.prompt_length + self.fed :]
        for token in new.tolist():
            self.feed(int(token))

    def fill(self, bitmask: np.ndarray, index: int, matchers: list):
        """Write this row's allowed tokens to `bitmask[index]` (the matcher's part is queued in
        `matchers`)."""
        if self.phase == THINKING:
            bitmask[index] = -1
            _set_bits(bitmask[index], self.end_ids, False)
            return
        matchers.append((self.matcher, index))

    def after_fill(self, bitmask: np.ndarray, index: int):
        if self.phase == OPEN:
            _set_bits(bitmask[index], [self.think_open], True)

    def processor(self):
        """The row as a logits processor for single-stream decoding (generate_step); it waits for
        the previous token, so the forward pass is queued first and runs while the mask is
        computed."""

        def process(history: mx.array, logits: mx.array) -> mx.array:
            mx.async_eval(logits)
            self.sync(history)
            return apply_masks(logits, fill_masks([self]))

        return process


def _set_bits(words: np.ndarray, ids, value: bool):
    bits = words.view(np.uint32)
    for t in ids:
        if value:
            bits[t // 32] |= np.uint32(1 << (t % 32))
        else:
            bits[t // 32] &= np.uint32(~(1 << (t % 32)) & 0xFFFFFFFF)


def fill_masks(rows: Sequence[RowGrammar]) -> np.ndarray:
    """One bitmask [rows, ceil(vocab / 32)] (int32 words, bit t of word t // 32 for token t) for
    a step."""
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

    bitmask = allocate_token_bitmask(len(rows), rows[0].n_vocab)
    matchers: list = []
    for i, row in enumerate(rows):
        row.fill(bitmask, i, matchers)
    if matchers:
        fill_next_token_bitmask_par(_executor(), matchers, bitmask)
    for i, row in enumerate(rows):
        row.after_fill(bitmask, i)
    return bitmask


def allowed_tokens(bitmask: np.ndarray, n_vocab: int) -> mx.array:
    """The bitmask as booleans [rows, vocab], unpacked with `mx` ops (any backend)."""
    words = mx.array(bitmask.view(np.uint32))
    bits = mx.right_shift(words[:, :, None], mx.arange(32, dtype=mx.uint32)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :n_vocab].astype(mx.bool_)


def apply_masks(logits: mx.array, bitmask: np.ndarray) -> mx.array:
    """Logits [rows, vocab] with every token a row's grammar refuses at -inf."""
    allowed = allowed_tokens(bitmask, logits.shape[-1])
    return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))


def step_masks(
    grammars: Sequence[Optional[RowGrammar]], ran: Optional[mx.array], logits: mx.array
) -> dict:
    """{row: allowed tokens [1, vocab]} for the constrained rows of a decode step, whose input
    tokens `ran` [rows] each row's matcher takes first; nothing at all when no row is
    constrained.

    The step's forward pass is queued before the host waits for those tokens, so it runs while
    the masks are computed, all into one bitmask."""
    rows = [(b, g) for b, g in enumerate(grammars) if g is not None]
    if not rows:
        return {}
    mx.async_eval(logits)
    if ran is not None:
        tokens = ran.tolist()
        for b, g in rows:
            g.feed(int(tokens[b]))
    allowed = allowed_tokens(fill_masks([g for _, g in rows]), logits.shape[-1])
    return {b: allowed[i : i + 1] for i, (b, _) in enumerate(rows)}
