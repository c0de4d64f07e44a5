"""Structured output: random checkpoints of every family, whose free replies are gibberish, answer
under a grammar with text that `jsonschema` validates; alone (stream_generate) and 8 rows to a
batch (the engine) give the same tokens; thinking stays free; tool calls are forced."""

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import tiny
from helpers import FORMATS, rfc3339_date
from schemas import SCHEMAS

from mlx_glm4v.checkpoints.loader import load
from mlx_glm4v.errors import Glm4vError
from mlx_glm4v.generation.chat import ChatSession
from mlx_glm4v.generation.constrain import Constraint, fill_masks
from mlx_glm4v.generation.generate import generate, stream_generate
from mlx_glm4v.generation.messages import build_messages
from mlx_glm4v.generation.reply import parse_reply, split_reply
from mlx_glm4v.generation.settings import GenerationSettings
from mlx_glm4v.serving.engine import Engine, Request, batch_generate

PROMPTS = ["hi", "Describe the picture.", "What is the answer?", "Fill in the form."]
MAX_TOKENS = 120  # the corpus finishes within about 70 tokens on the tiny checkpoints
FAMILIES = {
    "glm4v": "glm4v_checkpoint",
    "glm4v_moe": "glm4v_moe_checkpoint",
    "glm46v": "glm46v_checkpoint",
    "glm_ocr": "glm_ocr_checkpoint",
}


def valid(answer: str, schema: dict):
    jsonschema.validate(json.loads(answer), schema, format_checker=FORMATS)


@pytest.fixture(scope="module", params=list(FAMILIES))
def loaded(request):
    path = request.getfixturevalue(FAMILIES[request.param])[0]
    model, processor = load(path)
    return request.param, model, processor


def prompt_inputs(processor, prompt: str, suffix: str = "", **template):
    text = (
        processor.apply_chat_template(
            build_messages(prompt), add_generation_prompt=True, **template
        )
        + suffix
    )
    return processor(text)


@pytest.mark.parametrize("temp", [0.0, 1.0])
def test_schema_corpus_alone_and_in_a_batch(loaded, temp):
    """54 schemas; a thinking budget of 4 lets a model that opens <think> answer soon (GLM-4.5V's
    random weights do). Batched: one engine, 8 rows at a time. Alone: stream_generate with the
    same seed."""
    family, model, processor = loaded
    assert len(SCHEMAS) >= 50
    settings = [
        GenerationSettings(
            max_tokens=MAX_TOKENS,
            temp=temp,
            thinking_budget=4,
            constraint=Constraint("json_schema", s),
        )
        for s in SCHEMAS
    ]
    engine = Engine(model, processor, max_concurrency=8, max_queue=len(SCHEMAS))
    try:
        handles = [
            engine.submit(Request(prompt_inputs(processor, PROMPTS[i % 4]), s, seed=i))
            for i, s in enumerate(settings)
        ]
        batched = [list(h) for h in handles]
    finally:
        engine.close()
    assert engine.stats.decode_rows / engine.stats.decode_steps > 4  # rows really shared steps
    for i, (schema, events) in enumerate(zip(SCHEMAS, batched)):
        assert events[-1].finish_reason == "stop", (i, events[-1].finish_reason)
        text = "".join(e.text for e in events)
        valid(split_reply(text).answer, schema)
        alone = list(
            stream_generate(
                model,
                processor,
                PROMPTS[i % 4],
                seed=i,
                max_tokens=MAX_TOKENS,
                temp=temp,
                thinking_budget=4,
                constraint=Constraint("json_schema", schema),
            )
        )
        assert [r.token for r in alone] == [e.token for e in events], i
        assert alone[-1].finish_reason == "stop"


def test_constrained_and_free_rows_share_a_batch(loaded):
    """Rows with a schema, a regex and none at all in one batch, sampled: each is what it gets
    alone."""
    _, model, processor = loaded
    constraints = [
        Constraint("json_schema", SCHEMAS[i])
        if i % 3 == 0
        else Constraint("regex", "[a-z]{2,6}")
        if i % 3 == 1
        else None
        for i in range(8)
    ]
    settings = [
        GenerationSettings(max_tokens=40, temp=0.8, thinking_budget=4, constraint=c)
        for c in constraints
    ]
    engine = Engine(model, processor, max_concurrency=8)
    try:
        handles = [
            engine.submit(Request(prompt_inputs(processor, PROMPTS[i % 4]), s, seed=10 + i))
            for i, s in enumerate(settings)
        ]
        batched = [[e.token for e in h] for h in handles]
    finally:
        engine.close()
    for i, c in enumerate(constraints):
        alone = [
            r.token
            for r in stream_generate(
                model,
                processor,
                PROMPTS[i % 4],
                seed=10 + i,
                max_tokens=40,
                temp=0.8,
                thinking_budget=4,
                constraint=c,
            )
        ]
        assert alone == batched[i], i


def test_unconstrained_reply_is_gibberish(loaded):
    """The corpus test means something only if the free reply is not JSON to begin with."""
    _, model, processor = loaded
    text = generate(model, processor, PROMPTS[0], max_tokens=40, thinking_budget=4)
    with pytest.raises(ValueError):
        json.loads(split_reply(text).answer)


def test_no_mask_work_without_a_constrained_row(loaded, monkeypatch):
    _, model, processor = loaded
    calls = []
    monkeypatch.setattr(
        "mlx_glm4v.generation.constrain.fill_masks",
        lambda rows: calls.append(rows) or fill_masks(rows),
    )
    batch_generate(model, processor, PROMPTS, max_tokens=6)
    assert calls == []
    batch_generate(
        model, processor, PROMPTS[:1], max_tokens=6, constraint=Constraint("json_object")
    )
    assert calls


def test_regex_choice_and_lark(loaded):
    _, model, processor = loaded
    kw = dict(max_tokens=60, thinking_budget=2)

    def answer(c, **more):
        return split_reply(generate(model, processor, "hi", constraint=c, **kw, **more)).answer

    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", answer(Constraint("regex", r"[0-9]{3}-[a-z]{2}")))
    assert answer(Constraint("choice", ["yes", "no", "maybe"])) in ("yes", "no", "maybe")
    lark = 'start: "(" num ("," num)? ")"\nnum: /[0-9]{1,2}/'
    assert re.fullmatch(
        r"\([0-9]{1,2}(,[0-9]{1,2})?\)", answer(Constraint("lark", lark), temp=1.0, seed=5)
    )


def test_prompt_lookup_and_chat_give_the_same_tokens(loaded):
    """Prompt lookup checks drafts against the mask of each position; a chat turn is a generate
    call."""
    _, model, processor = loaded
    c = Constraint("json_schema", SCHEMAS[41])
    kw = dict(max_tokens=MAX_TOKENS, thinking_budget=4, constraint=c)
    plain = [r.token for r in stream_generate(model, processor, "hi", **kw)]
    looked = [r.token for r in stream_generate(model, processor, "hi", prompt_lookup=3, **kw)]
    chat = ChatSession(model, processor, **kw)
    assert looked == plain
    assert [r.token for r in chat.ask("hi")] == plain
    valid(split_reply("".join(r.text for r in chat.ask("again"))).answer, SCHEMAS[41])


@pytest.mark.parametrize("budget", [0, 16])
def test_glm41v_thinks_freely_then_answers_in_json(glm4v_checkpoint, budget):
    """The prompt opens <think>: the grammar sleeps until the budget forces </think>; the
    thinking is the model's own (the same tokens as unconstrained), the answer valid JSON."""
    model, processor = load(glm4v_checkpoint[0])
    schema = SCHEMAS[33]
    inputs = prompt_inputs(processor, "Read the receipt.", "<think>")
    out = {}
    for name, constraint in (("free", None), ("json", Constraint("json_schema", schema))):
        settings = GenerationSettings(
            max_tokens=MAX_TOKENS, thinking_budget=budget, constraint=constraint
        )
        engine = Engine(model, processor)
        try:
            out[name] = list(engine.submit(Request(inputs, settings, seed=0)))
        finally:
            engine.close()
    close = processor.convert_tokens_to_ids("</think>")
    tokens = [e.token for e in out["json"]]
    assert tokens.index(close) == budget
    assert tokens[: budget + 1] == [e.token for e in out["free"]][: budget + 1]
    text = "<think>" + "".join(e.text for e in out["json"])
    parts = split_reply(text)
    assert len(parts.reasoning) > 0 if budget else parts.reasoning == ""
    assert out["json"][-1].finish_reason == "stop"
    valid(parts.answer, schema)


def test_glm45v_with_thinking_off_answers_at_once(glm4v_moe_checkpoint):
    model, processor = load(glm4v_moe_checkpoint[0])
    schema = SCHEMAS[20]
    text = generate(
        model,
        processor,
        "hi",
        max_tokens=MAX_TOKENS,
        template_kwargs={"enable_thinking": False},
        constraint=Constraint("json_schema", schema),
    )
    assert "<think>" not in text
    valid(text, schema)


def test_a_reply_that_already_fits_keeps_its_tokens(glm4v_checkpoint, tmp_path):
    """A checkpoint scripted to think and then answer `[7]` in answer tags: under a schema that
    `[7]` satisfies, and under a regex, the reply is token for token the free one."""
    path = tiny.scripted_checkpoint(
        glm4v_checkpoint[0], tmp_path / "json", "<think>hm</think><answer>[7]</answer>"
    )
    model, processor = load(path)
    free = [r.token for r in stream_generate(model, processor, "hi", max_tokens=30)]
    assert processor.tokenizer.decode(free[:-1]) == "<think>hm</think><answer>[7]</answer>"
    for c in (
        Constraint("json_schema", {"type": "array", "items": {"type": "integer"}}),
        Constraint("regex", r"\[[0-9]\]"),
        Constraint("choice", ["[7]", "[8]"]),
    ):
        assert [
            r.token for r in stream_generate(model, processor, "hi", max_tokens=30, constraint=c)
        ] == free
    path = tiny.scripted_checkpoint(glm4v_checkpoint[0], tmp_path / "object", "<think>hm</think>{}")
    model, processor = load(path)
    free = [r.token for r in stream_generate(model, processor, "hi", max_tokens=30)]
    assert processor.tokenizer.decode(free[:-1]) == "<think>hm</think>{}"
    for c in (Constraint("json_object"), Constraint("lark", 'start: "{" "}"')):
        assert [
            r.token for r in stream_generate(model, processor, "hi", max_tokens=30, constraint=c)
        ] == free


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "required": ["city", "days"],
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "when": {"type": "string", "format": "date"},
                },
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "click",
            "parameters": {
                "type": "object",
                "required": ["x", "y"],
                "properties": {
                    "x": {"type": "integer", "minimum": 0, "maximum": 1000},
                    "y": {"type": "integer", "minimum": 0, "maximum": 1000},
                    "double": {"type": "boolean"},
                    "keys": {"type": "array", "items": {"enum": ["ctrl", "shift"]}, "maxItems": 2},
                },
            },
        },
    },
]


@pytest.mark.parametrize("name", ["get_weather", "click", None])
@pytest.mark.parametrize("temp", [0.0, 1.0])
def test_forced_tool_call_has_valid_arguments(loaded, name, temp):
    _, model, processor = loaded
    c = Constraint("tool_call", TOOLS, name)
    text = generate(
        model,
        processor,
        "What is the weather?",
        max_tokens=MAX_TOKENS,
        thinking_budget=4,
        temp=temp,
        seed=2,
        constraint=c,
    )
    reply = parse_reply(text, TOOLS)
    assert reply.content == "" and len(reply.calls) == 1, text
    call = reply.calls[0]
    assert call.name == name or (name is None and call.name in ("get_weather", "click"))
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.name)
    jsonschema.validate(json.loads(call.arguments), schema, format_checker=FORMATS)


@pytest.mark.parametrize(
    "constraint, words",
    [
        (
            Constraint("json_schema", {"type": "object", "unevaluatedProperties": False}),
            "unevaluatedProperties",
        ),
        (Constraint("json_schema", {"type": "string", "pattern": "(a"}), "cannot be compiled"),
        (Constraint("regex", "[a-"), "regex cannot be compiled"),
        (Constraint("lark", "start: nothing"), "Lark grammar cannot be compiled"),
        (Constraint("json_schema", {"enum": ["x" * 1000] * 300}), "at most"),
        (Constraint("tool_call", TOOLS, "nope"), "'nope'"),
        (
            Constraint(
                "tool_call",
                [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {
                                "properties": {"s": {"type": "string", "format": "hostname"}}
                            },
                        },
                    }
                ],
                None,
            ),
            "hostname",
        ),
    ],
)
def test_bad_constraints_are_one_sentence(constraint, words):
    with pytest.raises(Glm4vError) as e:
        GenerationSettings(constraint=constraint)
    message = str(e.value)
    assert words in message and "\n" not in message and "Traceback" not in message


def test_dates_know_the_calendar(glm4v_checkpoint):
    from llguidance import LLMatcher

    from mlx_glm4v.generation.constrain import grammar_tokenizer

    _, processor = load(glm4v_checkpoint[0])
    tokenizer = grammar_tokenizer(processor, 400, [0])
    grammar = Constraint("json_schema", {"type": "string", "format": "date"}).grammar
    for date, ok in (
        ("2024-02-29", True),
        ("2000-02-29", True),
        ("0000-02-29", True),
        ("2023-02-28", True),
        ("2023-02-29", False),
        ("1900-02-29", False),
        ("2023-04-31", False),
        ("2023-13-01", False),
    ):
        matcher, ids = LLMatcher(tokenizer, grammar), processor.tokenizer.encode(json.dumps(date))
        assert (
            (matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting())
            == ok
            == rfc3339_date(date)
        )


def test_constraint_kinds_are_checked():
    with pytest.raises(Glm4vError, match="unknown"):
        Constraint("xml")
    with pytest.raises(Glm4vError, match="needs a dict"):
        Constraint("json_schema", "{}")
    with pytest.raises(Glm4vError, match="non-empty"):
        Constraint("choice", [])


def test_cli_schema_regex_and_choice(glm4v_checkpoint, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS[19]))
    base = [
        sys.executable,
        "-m",
        "mlx_glm4v",
        "generate",
        "--model",
        str(glm4v_checkpoint[0]),
        "-p",
        "hi",
        "--max-tokens",
        str(MAX_TOKENS),
    ]
    runs = {
        "schema": ["--schema", str(schema)],
        "inline": ["--schema", json.dumps(SCHEMAS[2])],
        "regex": ["--regex", "[a-z]{3}"],
        "choice": ["--choice", "left,right"],
    }
    out = {
        k: subprocess.run(base + v, capture_output=True, text=True, timeout=120)
        for k, v in runs.items()
    }
    assert all(r.returncode == 0 for r in out.values()), {k: r.stderr for k, r in out.items()}
    valid(out["schema"].stdout.strip(), SCHEMAS[19])
    valid(out["inline"].stdout.strip(), SCHEMAS[2])
    assert re.fullmatch(r"[a-z]{3}", out["regex"].stdout.strip())
    assert out["choice"].stdout.strip() in ("left", "right")
    bad = subprocess.run(
        base + ["--schema", '{"type": "object", "unevaluatedProperties": false}'],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        bad.returncode == 1
        and bad.stderr.count("\n") == 1
        and "unevaluatedProperties" in bad.stderr
    )
    both = subprocess.run(
        base + ["--regex", "a", "--choice", "a,b"], capture_output=True, text=True, timeout=120
    )
    assert both.returncode == 1 and "one of" in both.stderr


def test_constrained_benchmark_tiny(tmp_path, capsys):
    """The benchmark's code, kept working (not a timed test): every figure present and positive."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import constrained

    results = constrained.main(
        [
            "--tiny",
            "--work",
            str(tmp_path),
            "--rounds",
            "1",
            "--json-out",
            str(tmp_path / "out.json"),
        ]
    )
    assert json.loads((tmp_path / "out.json").read_text())["max_tokens"] == 24
    for rows in (1, 8):
        r = results[f"rows_{rows}"]
        assert r["free_tps"] > 0 and r["schema_tps"] > 0
    assert results["mask_ms_per_token"]["steps"] > 24 and results["mask_ms_per_token"]["p99"] > 0
    assert results["compile_ms"]["schemas"] == len(SCHEMAS) + 1
    assert "nested schema" in capsys.readouterr().out


def test_settings_travel_between_ranks_as_json():
    """lockstep.py sends a request's settings as `dataclasses.asdict` through JSON; the
    constraint survives."""
    import dataclasses

    settings = GenerationSettings(constraint=Constraint("tool_call", TOOLS, "click"))
    back = GenerationSettings(**json.loads(json.dumps(dataclasses.asdict(settings))))
    assert back.constraint.key() == settings.constraint.key()
    assert back.constraint.grammar == settings.constraint.grammar


def test_serving_benchmark_schema_set(tmp_path):
    """serve_bench.py's `schema` set: every reply valid, 4 rows at once equal to one at a time."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import serve_bench

    rows = serve_bench.main(
        [
            "--in-process",
            "--tiny",
            "--blas",
            "bundled",
            "--sets",
            "schema",
            "--clients",
            "1,4",
            "--sequential",
            "4",
            "--work",
            str(tmp_path),
        ]
    )
    assert [(r["clients"], r["valid"], r["identical"]) for r in rows] == [
        (1, "4/4", None),
        (4, "4/4", True),
    ]
