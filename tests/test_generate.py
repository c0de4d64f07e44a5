"""Generation, chat sessions, the rotating cache and the command line, against transformers.

Images and video frames here have sides that are multiples of 28, so that no resize happens:
our PIL path and the reference's torchvision path then give identical pixels, and greedy
tokens can be compared over many steps without a near-tie flipping on a pixel rounding.
"""

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import clip, picture
from reference import ref_generate

from mlx_glm4v.checkpoints.loader import load
from mlx_glm4v.generation.chat import ChatSession, drop_thinking
from mlx_glm4v.generation.generate import generate, generate_step, stream_generate
from mlx_glm4v.generation.settings import GenerationSettings
from mlx_glm4v.generation.streaming import StopStrings
from mlx_glm4v.inputs.video import Video

STEPS = 12


@pytest.fixture(scope="module")
def setup(glm4v_checkpoint, tmp_path_factory):
    path, ref, hf_processor = glm4v_checkpoint
    model, processor = load(path)
    media = tmp_path_factory.mktemp("media")
    image = media / "photo.png"
    picture(196, 280, 21).save(image)
    return dict(path=path, ref=ref, hf=hf_processor, model=model, processor=processor, image=image)


def test_greedy_text_equals_transformers(setup):
    prompt = "Hello! How are you today?"
    tokens, text = ref_generate(setup, [{"role": "user", "content": prompt}], STEPS)
    ours = [
        r for r in stream_generate(setup["model"], setup["processor"], prompt, max_tokens=STEPS)
    ]
    assert [r.token for r in ours if r.token is not None and r.finish_reason != "stop"] == tokens
    assert "".join(r.text for r in ours) == text


def test_greedy_image_equals_transformers(setup):
    from PIL import Image

    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}],
        }
    ]
    tokens, text = ref_generate(setup, messages, STEPS, images=[Image.open(setup["image"])])
    ours = generate(
        setup["model"],
        setup["processor"],
        "Describe this image.",
        images=[str(setup["image"])],
        max_tokens=STEPS,
    )
    assert ours == text


def test_greedy_video_equals_transformers(setup):
    frames = clip(5, 56, 84, 22)
    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}
    ]
    tokens, text = ref_generate(
        setup,
        messages,
        STEPS,
        videos=[frames],
        video_metadata=[{"fps": 2.0, "total_num_frames": 5}],
    )
    ours = generate(
        setup["model"],
        setup["processor"],
        "What happens?",
        videos=[Video(frames, fps=2.0)],
        max_tokens=STEPS,
    )
    assert ours == text


def greedy_from_scratch(s, messages, steps):
    """Tokens of a fresh generation over a whole conversation given as messages."""
    return [
        r.token
        for r in stream_generate(s["model"], s["processor"], messages, max_tokens=steps)
        if r.token is not None
    ]


def greedy_over(s, session, images, steps):
    """Tokens of a fresh generation, new cache, over the token ids a chat turn ran (the oracle
    for cache reuse: earlier replies stay in the conversation as they were generated)."""
    inputs = {"input_ids": np.array([session.prompt_ids])}
    if images:
        inputs.update(
            {
                k: v
                for k, v in s["processor"]("<|image|>" * len(images), images=images).items()
                if k in ("pixel_values", "image_grid_thw")
            }
        )
    tokens = [
        t for t, _ in generate_step(s["model"], inputs, s["model"].make_cache(), max_tokens=steps)
    ]
    eos = set(s["model"].config.eos_token_id)
    return next((tokens[: i + 1] for i, t in enumerate(tokens) if t in eos), tokens)


def test_second_turn_reuses_the_cache(setup, monkeypatch):
    model, processor = setup["model"], setup["processor"]
    session = ChatSession(model, processor, system="You are terse.", max_tokens=6)
    list(session.ask("Describe this image.", images=[str(setup["image"])]))
    first_prompt = len(session.history_ids)

    encoded = count_tower_calls(monkeypatch)
    second = [r.token for r in session.ask("Why is that?") if r.token is not None]
    monkeypatch.undo()

    assert not encoded, "the image was encoded again"
    # only the new question
    assert 0 < session.tokens_processed <= len(session.prompt_ids) - first_prompt
    assert second == greedy_over(setup, session, [str(setup["image"])], 6)


def test_later_turn_with_a_new_image(setup):
    model, processor = setup["model"], setup["processor"]
    session = ChatSession(model, processor, max_tokens=5)
    list(session.ask("Hello! How are you today?"))
    other = setup["image"].with_name("other.png")
    picture(112, 168, 23).save(other)
    tokens = [r.token for r in session.ask("And this?", images=[str(other)]) if r.token is not None]
    assert tokens == greedy_over(setup, session, [str(other)], 5)


def count_tower_calls(monkeypatch) -> list:
    from mlx_glm4v.models.vision import VisionModel

    calls = []
    tower = VisionModel.__call__
    monkeypatch.setattr(VisionModel, "__call__", lambda *a: calls.append(1) or tower(*a))
    return calls


def test_new_question_about_the_same_image_reuses_its_tokens(setup, monkeypatch):
    model, processor, image = setup["model"], setup["processor"], str(setup["image"])
    session = ChatSession(model, processor, max_tokens=5)
    list(session.ask("Describe this image.", images=[image]))
    first = session.tokens_processed
    session.reset()
    calls = count_tower_calls(monkeypatch)
    tokens = [
        r.token
        for r in session.ask("What colour dominates?", images=[image])
        if r.token is not None
    ]
    monkeypatch.undo()
    assert not calls and session.tokens_processed <= first - 70  # the image's 70 tokens were reused
    assert tokens == greedy_from_scratch(setup, session.messages[:-1], 5)


def test_the_same_prompt_again_runs_only_its_last_token(setup):
    model, processor, image = setup["model"], setup["processor"], str(setup["image"])
    session = ChatSession(model, processor, max_tokens=5)
    first = [
        r.token for r in session.ask("Describe this image.", images=[image]) if r.token is not None
    ]
    session.reset()
    again = [
        r.token for r in session.ask("Describe this image.", images=[image]) if r.token is not None
    ]
    assert session.tokens_processed == 1 and again == first


def test_another_image_of_the_same_size_is_not_mistaken_for_the_first(setup):
    model, processor, image = setup["model"], setup["processor"], str(setup["image"])
    other = setup["image"].with_name("same-size.png")
    picture(196, 280, 99).save(other)
    session = ChatSession(model, processor, max_tokens=5)
    list(session.ask("Describe this image.", images=[image]))
    session.reset()
    tokens = [
        r.token
        for r in session.ask("Describe this image.", images=[str(other)])
        if r.token is not None
    ]
    assert session.tokens_processed > 70  # the new image was run, not the cached one
    assert tokens == greedy_from_scratch(setup, session.messages[:-1], 5)


def test_an_image_shown_again_is_not_encoded_again(setup, monkeypatch):
    model, processor, image = setup["model"], setup["processor"], str(setup["image"])
    session = ChatSession(model, processor, max_tokens=5)
    list(session.ask("Describe this image.", images=[image]))
    calls = count_tower_calls(monkeypatch)
    tokens = [r.token for r in session.ask("Look again.", images=[image]) if r.token is not None]
    monkeypatch.undo()
    assert not calls
    assert tokens == greedy_over(setup, session, [image, image], 5)


def test_each_image_is_hashed_once_per_turn(setup, monkeypatch):
    import hashlib

    import mlx_glm4v.models.media

    hashes = []
    blake2b = hashlib.blake2b
    monkeypatch.setattr(
        mlx_glm4v.models.media.hashlib,
        "blake2b",
        lambda *a, **k: hashes.append(1) or blake2b(*a, **k),
    )
    session = ChatSession(setup["model"], setup["processor"], max_tokens=2)
    list(session.ask("Describe this image.", images=[str(setup["image"])]))
    assert len(hashes) == 1


def test_thinking_is_dropped_from_the_history():
    assert (
        drop_thinking("<think>let me see</think><answer>A cat.</answer>")
        == "<answer>A cat.</answer>"
    )
    assert drop_thinking("<think>unfinished") == ""


def test_a_history_run_again_from_text_drops_thinking(setup):
    model, processor = setup["model"], setup["processor"]
    session = ChatSession(model, processor, max_tokens=3)
    list(session.ask("Hello! How are you today?"))
    # as if the model had thought aloud
    session.messages[-1]["content"] = "<think>hidden</think>shown"
    session.cache = None  # e.g. a reply interrupted between layers: the next turn starts from text
    tokens = [r.token for r in session.ask("And then?") if r.token is not None]
    assert session.messages[1]["content"] == "shown"
    assert "hidden" not in processor.tokenizer.decode(session.prompt_ids)
    assert tokens == greedy_from_scratch(setup, session.messages[:-1], 3)


def test_rotating_cache_matches_a_windowed_reference(setup):
    """Past its limit the cache sees the kept prefix (system prompt, image) and the latest tokens.

    The oracle is transformers over the whole sequence with a mask that shows each decoded
    token exactly that: the kept prefix and the last `max_kv_size - keep` tokens.
    """
    model, processor, ref = setup["model"], setup["processor"], setup["ref"]
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}],
        }
    ]
    inputs = processor(processor.apply_chat_template(messages), images=[str(setup["image"])])
    n = inputs["input_ids"].shape[1]
    size, steps = n + 6, 24
    cache = GenerationSettings(max_kv_size=size).new_cache(model, processor, inputs["input_ids"])
    keep = cache[0].keep
    image_end = inputs["input_ids"][0].tolist().index(model.config.image_end_token_id)
    assert keep == image_end + 1  # through the image; the question after it may rotate out
    produced = list(generate_step(model, inputs, cache, max_tokens=steps))  # greedy
    kept = np.array(cache[0].keys[..., :keep, :])
    assert cache[0].offset == n + steps - 1 > size  # it rotated; the last token was never fed
    assert (
        cache.next_position[0]
        == model.prepare(
            inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"]
        ).next_position[0]
        + steps
        - 1
    )

    ids = np.concatenate([inputs["input_ids"][0], [t for t, _ in produced[:-1]]])[None]
    t = {k: torch.tensor(v) for k, v in inputs.items()}
    full = torch.tensor(ids)
    types = torch.cat([t["mm_token_type_ids"], torch.zeros(1, steps - 1, dtype=torch.int32)], 1)
    positions, _ = ref.model.get_rope_index(full, types, t["image_grid_thw"])
    rows, cols = np.arange(ids.shape[1])[:, None], np.arange(ids.shape[1])[None]
    visible = (cols <= rows) & ((rows < n) | (cols < keep) | (cols > rows - (size - keep)))
    with torch.no_grad():
        logits = ref(
            input_ids=full,
            pixel_values=t["pixel_values"],
            image_grid_thw=t["image_grid_thw"],
            position_ids=positions,
            attention_mask=torch.tensor(visible)[None, None],
        ).logits[0]
    expected = torch.log_softmax(logits[n - 1 :], -1).numpy()
    ours = np.stack([np.array(lp) for _, lp in produced])
    assert np.abs(ours - expected).max() <= 1e-4
    assert [tok for tok, _ in produced] == expected.argmax(-1).tolist()
    np.testing.assert_array_equal(np.array(cache[0].keys[..., :keep, :]), kept)


@pytest.mark.parametrize("media", ["text", "image"])
def test_prompt_lookup_keeps_greedy_output(setup, media, monkeypatch):
    model, processor = setup["model"], setup["processor"]
    prompt = "Hello! How are you today? Hello! How are you today?"
    kwargs = {"images": [str(setup["image"])]} if media == "image" else {}
    plain = [
        r.token
        for r in stream_generate(model, processor, prompt, max_tokens=40, ignore_eos=True, **kwargs)
    ]
    passes = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: passes.append(1) or forward(*a, **k))
    looked_up = [
        r.token
        for r in stream_generate(
            model, processor, prompt, max_tokens=40, ignore_eos=True, prompt_lookup=4, **kwargs
        )
    ]
    assert looked_up == plain
    assert len(passes) < 40  # some drafts were accepted: fewer forward passes than tokens


def test_streamed_text_never_splits_a_character(setup):
    from mlx_glm4v.generation.streaming import StreamingText

    tokenizer = setup["processor"].tokenizer
    text = "Ünïcödé text, emoji 🙂 and 中文 字符 <think>ok</think>"
    ids = tokenizer.encode(text)
    # some character spans tokens
    assert any("\ufffd" in tokenizer.decode(ids[:k]) for k in range(len(ids)))
    stream = StreamingText(tokenizer.backend)
    pieces = [stream.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.finish() == tokenizer.decode(ids) == text


def test_stop_strings_hold_back_and_cut():
    stops = StopStrings(["END"])
    assert stops.feed("abc E") == ("abc ", None)
    assert stops.feed("N") == ("", None)
    assert stops.feed("Dxyz") == ("", "END")
    stops = StopStrings(["END"])
    assert stops.feed("E") == ("", None)
    assert stops.feed("go") == ("Ego", None)


def test_stop_strings_say_which_one_cut():
    """The server reports the stop string that ended a reply, even one that began in text held
    back, and the earliest one where two are in the text."""
    stops = StopStrings(["never-seen", "hello world"])
    assert stops.feed("say hello") == ("say ", None)
    assert stops.feed(" world!") == ("", "hello world")
    stops = StopStrings(["b", "ab"])
    assert stops.feed("xab") == ("x", "ab")


def cli(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "mlx_glm4v.cli", *args], capture_output=True, text=True, **kwargs
    )


def test_generation_does_not_import_transformers():
    """mlx-lm's package start-up (transformers, ~0.8 s) is deferred until something asks for it."""
    code = (
        "import sys, mlx_glm4v.generation.generate, mlx_glm4v.generation.chat, "
        "mlx_glm4v.checkpoints.loader;"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules;"
        "import mlx_lm; assert callable(mlx_lm.load) and 'transformers' in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_generate_json(setup):
    out = cli(
        "generate",
        "--model",
        str(setup["path"]),
        "--image",
        str(setup["image"]),
        "--prompt",
        "Describe this image.",
        "--max-tokens",
        "7",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) >= {
        "text",
        "prompt_tokens",
        "generation_tokens",
        "prompt_tps",
        "generation_tps",
        "peak_memory_gb",
    }
    expected = generate(
        setup["model"],
        setup["processor"],
        "Describe this image.",
        images=[str(setup["image"])],
        max_tokens=7,
    )
    assert result["text"] == expected
    inputs = setup["processor"](
        setup["processor"].apply_chat_template(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": "Describe this image."},
                    ],
                }
            ]
        ),
        images=[str(setup["image"])],
    )
    assert result["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert 1 <= result["generation_tokens"] <= 7
    assert result["prompt_tps"] > 0 and result["peak_memory_gb"] > 0
    assert result["generation_tps"] > 0 or result["generation_tokens"] == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--image", "/no/such/photo.jpg"], "no such image file"),
        (["--video", "/no/such/clip.mp4"], "no such video file"),
        (["--temp", "-1"], "temperature -1.0 is negative"),
        (["--kv-bits", "7"], "kv-bits 7 is not supported"),
        (["--max-tokens", "0"], "max-tokens 0 must be at least 1"),
        (["--max-kv-size", "4", "--kv-bits", "4"], "cannot be combined"),
    ],
)
def test_generate_user_errors(setup, args, message):
    out = cli("generate", "--model", str(setup["path"]), "--prompt", "hi", *args)
    assert out.returncode != 0
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_unknown_model_is_one_line(tmp_path):
    out = cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert out.returncode == 1 and "neither an existing directory nor a hub repo id" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    verbose = cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi", "--verbose")
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_no_thinking_reaches_the_template(glm4v_moe_checkpoint):
    """GLM-4.5V's template has a thinking switch: --no-thinking renders what transformers
    renders."""
    from mlx_glm4v.inputs.processor import Processor

    path, _, hf = glm4v_moe_checkpoint
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello!"}]}]
    ours = Processor.from_pretrained(path).apply_chat_template(messages, enable_thinking=False)
    assert "/nothink" in ours and ours == hf.apply_chat_template(
        messages, add_generation_prompt=True, enable_thinking=False
    )
    out = cli(
        "generate",
        "--model",
        str(path),
        "--prompt",
        "Hello!",
        "--max-tokens",
        "2",
        "--no-thinking",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["prompt_tokens"] == len(
        Processor.from_pretrained(path)(ours)["input_ids"][0]
    )


def test_hub_ids_download_only_what_a_run_needs(monkeypatch, tmp_path, glm4v_checkpoint):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from mlx_glm4v.checkpoints.loader import resolve
    from mlx_glm4v.errors import Glm4vError

    calls = []

    def fake_download(repo, revision=None, allow_patterns=None):
        calls.append((repo, allow_patterns))
        if repo == "nobody/nothing":
            # as raised for a 404, sans HTTP
            error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
            Exception.__init__(error, "404")
            raise error
        return str(glm4v_checkpoint[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve("zai-org/GLM-4.1V-9B-Thinking") == glm4v_checkpoint[0]
    patterns = calls[0][1]
    assert (
        "*.safetensors" in patterns
        and "*.json" in patterns
        and not any("bin" in p or "pt" in p for p in patterns)
    )
    with pytest.raises(Glm4vError, match="nobody/nothing was not found on the Hugging Face hub"):
        resolve("nobody/nothing")


def test_chat_in_a_terminal(setup):
    import pexpect

    child = pexpect.spawn(
        sys.executable,
        [
            "-m",
            "mlx_glm4v.cli",
            "chat",
            "--model",
            str(setup["path"]),
            "--image",
            str(setup["image"]),
            "--max-tokens",
            "4",
        ],
        encoding="utf-8",
        timeout=120,
    )
    child.expect(">> ")
    child.sendline("Describe this image.")
    child.expect(">> ")
    first = child.before
    child.sendline("/image " + str(setup["image"]))
    child.expect(">> ")
    child.sendline("And again?")
    child.expect(">> ")
    child.sendline("/reset")
    child.expect(">> ")
    child.sendline("/image /no/such/file.png")
    child.expect("no such image file")
    child.expect(">> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert first.strip()  # a reply was printed


@pytest.mark.parametrize(
    "inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["sigint-default", "sigint-ignored"]
)
def test_ctrl_c_stops_the_reply_and_keeps_the_session(setup, inherited):
    """Also when the chat inherits SIGINT ignored, as a background job of a shell script does
    (how CI may start the suite): Python then installs no KeyboardInterrupt of its own."""
    import time

    import pexpect

    child = pexpect.spawn(
        sys.executable,
        [
            "-m",
            "mlx_glm4v.cli",
            "chat",
            "--model",
            str(setup["path"]),
            "--max-tokens",
            "1000000",
            "--ignore-eos",
        ],
        encoding="utf-8",
        timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGINT, inherited),
    )
    child.expect(">> ")
    child.sendline("Hello! How are you today?")
    time.sleep(2)  # replying, at hundreds of tokens a second, for an hour
    child.sendintr()
    child.expect(r"\(stopped\)")
    child.expect(">> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
