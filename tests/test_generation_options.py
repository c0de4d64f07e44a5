"""Generation options against transformers: the thinking budget, the KV cache's group size and
the reply split the Python API offers.

The tiny checkpoints are random and never open `<think>` themselves; GLM-4.1V's real template
leaves that to the model. So the thinking tests use a copy of the tiny checkpoint whose
template's generation prompt ends with `<think>`, as a model that always thinks starts.
"""

import pytest
import torch

from mlx_glm4v.checkpoints.loader import load
from mlx_glm4v.errors import Glm4vError
from mlx_glm4v.generation.chat import ChatSession
from mlx_glm4v.generation.generate import stream_generate
from mlx_glm4v.generation.settings import GenerationSettings

PROMPT = "Hello! How are you today?"


@pytest.fixture(scope="module")
def thinking(glm4v_checkpoint, tmp_path_factory):
    """The tiny GLM-4.1V with a generation prompt that opens the thinking: model, processor,
    reference."""
    path, ref, _ = glm4v_checkpoint
    copy = tmp_path_factory.mktemp("glm4v-thinks")
    for f in path.iterdir():
        if f.name != "chat_template.jinja":
            (copy / f.name).symlink_to(f)
    template = (path / "chat_template.jinja").read_text()
    assert template.count("<|assistant|>\n{% endif %}") == 1
    (copy / "chat_template.jinja").write_text(
        template.replace("<|assistant|>\n{% endif %}", "<|assistant|>\n<think>{% endif %}")
    )
    model, processor = load(copy)
    return dict(path=copy, ref=ref, model=model, processor=processor)


def reference_with_budget(s, prompt_ids, budget, steps):
    """transformers' greedy continuation of the prompt, with `</think>` put in after `budget`
    tokens."""
    close = s["processor"].convert_tokens_to_ids("</think>")
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        thought = s["ref"].generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=budget + 1,
            do_sample=False,
            eos_token_id=None,
        )
        free = thought[0, ids.shape[1] :].tolist()
        forced = torch.cat([thought[:, :-1], torch.tensor([[close]])], dim=1)
        answer = s["ref"].generate(
            forced,
            attention_mask=torch.ones_like(forced),
            max_new_tokens=steps - budget - 1,
            do_sample=False,
            eos_token_id=None,
        )
    return free, forced[0, ids.shape[1] :].tolist() + answer[0, forced.shape[1] :].tolist()


def prompt_ids(s, prompt=PROMPT):
    processor = s["processor"]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    )
    assert text.endswith("<think>")
    return processor(text)["input_ids"][0].tolist()


@pytest.mark.parametrize("budget", [0, 5])
def test_thinking_budget_equals_transformers_with_think_closed(thinking, budget):
    steps = budget + 8
    free, expected = reference_with_budget(thinking, prompt_ids(thinking), budget, steps)
    close = thinking["processor"].convert_tokens_to_ids("</think>")
    # left alone, the model keeps thinking: the budget changes the reply
    assert free[budget] != close
    ours = [
        r.token
        for r in stream_generate(
            thinking["model"],
            thinking["processor"],
            PROMPT,
            max_tokens=steps,
            thinking_budget=budget,
            ignore_eos=True,
        )
        if r.token is not None
    ]
    assert ours == expected
    assert ours[budget] == close and close not in ours[budget + 1 :]
    unbounded = [
        r.token
        for r in stream_generate(
            thinking["model"], thinking["processor"], PROMPT, max_tokens=steps, ignore_eos=True
        )
        if r.token is not None
    ]
    assert unbounded[: budget + 1] == free and close not in unbounded


def test_thinking_budget_with_prompt_lookup_and_sampling(thinking):
    """The processor holds no state: drafts verified in one pass and sampled tokens obey it
    alike."""
    close = thinking["processor"].convert_tokens_to_ids("</think>")
    prompt = "Hello! How are you today? Hello! How are you today?"
    options = dict(max_tokens=30, thinking_budget=12, ignore_eos=True)
    plain = [
        r.token
        for r in stream_generate(thinking["model"], thinking["processor"], prompt, **options)
    ]
    assert close not in plain[:12]
    looked_up = [
        r.token
        for r in stream_generate(
            thinking["model"], thinking["processor"], prompt, prompt_lookup=4, **options
        )
    ]
    assert looked_up == plain and plain[12] == close
    sampled = [
        r.token
        for r in stream_generate(
            thinking["model"], thinking["processor"], prompt, temp=1.5, seed=3, **options
        )
    ]
    assert sampled[12] == close and close not in sampled[:12]


def test_chat_session_thinking_budget(thinking):
    session = ChatSession(
        thinking["model"], thinking["processor"], max_tokens=10, thinking_budget=3, ignore_eos=True
    )
    first = [r.token for r in session.ask(PROMPT) if r.token is not None]
    _, expected = reference_with_budget(thinking, session.prompt_ids, 3, 10)
    assert first == expected
    # the next turn's budget counts from its own <think>, not from the first turn's
    second = [r.token for r in session.ask("And then?") if r.token is not None]
    _, expected = reference_with_budget(thinking, session.prompt_ids, 3, 10)
    assert second == expected


def test_thinking_budget_needs_think_tokens_and_a_sane_value(thinking):
    with pytest.raises(Glm4vError, match="thinking budget -1 must be 0 or a positive"):
        GenerationSettings(thinking_budget=-1)
    with pytest.raises(Glm4vError, match="needs the processor"):
        GenerationSettings(thinking_budget=3).step_options()


def test_kv_bits_picks_a_group_size_the_head_size_allows(glm4v_checkpoint, glm4v_moe_checkpoint):
    """The tiny GLM-4.1V has 32-wide heads (MLX's default group, 64, does not divide them); the tiny
    GLM-4.5V 48-wide ones (no group size MLX supports does)."""
    from mlx_glm4v.generation.settings import kv_group_size_for

    model, processor = load(glm4v_checkpoint[0])
    assert model.config.text_config.head_dim == 32 and kv_group_size_for(model, 64) == 32
    quantized = [
        r.token
        for r in stream_generate(model, processor, PROMPT, max_tokens=6, kv_bits=8, ignore_eos=True)
    ]
    explicit = [
        r.token
        for r in stream_generate(
            model, processor, PROMPT, max_tokens=6, kv_bits=8, kv_group_size=32, ignore_eos=True
        )
    ]
    assert quantized == explicit and len(quantized) == 7 and quantized[-1] is None
    moe, moe_processor = load(glm4v_moe_checkpoint[0])
    with pytest.raises(Glm4vError, match=r"head size \(48\) to be a multiple of 32, 64 or 128"):
        list(stream_generate(moe, moe_processor, PROMPT, max_tokens=2, kv_bits=4))


def test_reply_split_is_part_of_the_api():
    import mlx_glm4v

    parts = mlx_glm4v.split_reply(
        "<think>Count the cats.</think><answer>Two <|begin_of_box|>cats<|end_of_box|>.</answer>"
    )
    assert (parts.reasoning, parts.answer) == ("Count the cats.", "Two cats.")


def test_thinking_budgets_per_row_in_the_engine(thinking):
    """Rows with different budgets (and one without) share a batch; each equals its
    stream_generate."""
    from mlx_glm4v.serving.engine import Engine, Request

    model, processor = thinking["model"], thinking["processor"]
    close = processor.convert_tokens_to_ids("</think>")
    prompts = [PROMPT, "The quick brown fox.", PROMPT, "Count to three."]
    budgets = [0, 3, 6, None]
    expected = [
        [
            r.token
            for r in stream_generate(
                model, processor, p, max_tokens=12, thinking_budget=b, ignore_eos=True
            )
            if r.token is not None
        ]
        for p, b in zip(prompts, budgets)
    ]
    engine = Engine(model, processor, max_concurrency=4)
    try:
        handles = []
        for p, b in zip(prompts, budgets):
            text = processor.apply_chat_template([{"role": "user", "content": p}])
            settings = GenerationSettings(max_tokens=12, thinking_budget=b, ignore_eos=True)
            handles.append(engine.submit(Request(processor(text), settings)))
        got = [[e.token for e in h if e.token is not None] for h in handles]
    finally:
        engine.close()
    assert got == expected
    for tokens, budget in zip(got[:3], budgets[:3]):
        assert tokens[budget] == close
