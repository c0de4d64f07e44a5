"""GLM-OCR through the doors the other families use: `generate` on the command line, the
Python API with an image, `chat` (the session in process and the terminal), and `serve` in every
dialect (chat completions, Responses, Anthropic Messages, Ollama's /api/chat); each reply equals
transformers' greedy generate on the same tiny checkpoint (hub layout, MTP layer appended)."""

import base64
import io
import subprocess
import sys

import httpx
import pexpect
import pytest
from helpers import picture
from reference import ref_generate
from servers import Server
from test_generate import greedy_over
from test_terminal import reply_in, spawn

from mlx_glm4v.checkpoints.loader import load
from mlx_glm4v.generation.chat import ChatSession
from mlx_glm4v.generation.generate import generate
from mlx_glm4v.terminal import ReplyDisplay

STEPS = 8


@pytest.fixture(scope="module")
def setup(glm_ocr_checkpoint, tmp_path_factory):
    path, ref, hf_processor = glm_ocr_checkpoint
    model, processor = load(path)
    image = tmp_path_factory.mktemp("media") / "page.png"
    picture(140, 196, 5).save(image)
    return dict(path=path, ref=ref, hf=hf_processor, model=model, processor=processor, image=image)


def image_message(text):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def test_python_api_greedy_equals_transformers(setup):
    from PIL import Image

    _, text = ref_generate(
        setup, image_message("Text Recognition:"), STEPS, images=[Image.open(setup["image"])]
    )
    ours = generate(
        setup["model"],
        setup["processor"],
        "Text Recognition:",
        images=[str(setup["image"])],
        max_tokens=STEPS,
    )
    assert ours == text


def test_cli_greedy_equals_transformers(setup):
    prompt = "Hello! How are you today?"
    _, text = ref_generate(setup, [{"role": "user", "content": prompt}], STEPS)
    run = subprocess.run(
        [sys.executable, "-m", "mlx_glm4v", "generate", "--model", str(setup["path"])]
        + ["--prompt", prompt, "--max-tokens", str(STEPS), "--temp", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    # universal newlines: the reply's carriage returns read back as newlines
    expected = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    assert expected and expected in run.stdout


def page_url(setup):
    buffer = io.BytesIO()
    from PIL import Image

    Image.open(setup["image"]).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(setup, tmp_path_factory):
    server = Server(setup["path"], [], tmp_path_factory.mktemp("ocr-serve") / "server.log")
    yield server
    server.close()


@pytest.fixture(scope="module")
def expected(setup):
    """transformers' greedy reply to the page and "Text Recognition:"."""
    from PIL import Image

    _, text = ref_generate(
        setup, image_message("Text Recognition:"), STEPS, images=[Image.open(setup["image"])]
    )
    assert text.strip()
    return text


def test_chat_completions_equal_transformers(setup, server, expected):
    reply = server.post(
        {
            "model": server.model,
            "max_tokens": STEPS,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": page_url(setup)}},
                        {"type": "text", "text": "Text Recognition:"},
                    ],
                }
            ],
        }
    )
    assert reply.status_code == 200, reply.text
    message = reply.json()["choices"][0]["message"]
    assert (message.get("reasoning_content") or "") + (message["content"] or "") == expected


def test_responses_equal_transformers(setup, server, expected):
    parts = [
        {"type": "input_image", "image_url": page_url(setup), "detail": "original"},
        {"type": "input_text", "text": "Text Recognition:"},
    ]
    whole = server.client.responses.create(
        model=server.model,
        input=[{"role": "user", "content": parts}],
        temperature=0,
        max_output_tokens=STEPS,
    )
    reasoning = [i for i in whole.output if i.type == "reasoning"]
    thinking = "".join(c.text for i in reasoning for c in i.content or [])
    assert thinking + whole.output_text == expected


def test_anthropic_messages_equal_transformers(setup, server, expected):
    data = page_url(setup).split(",", 1)[1]
    body = {
        "model": server.model,
        "max_tokens": STEPS,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": data},
                    },
                    {"type": "text", "text": "Text Recognition:"},
                ],
            }
        ],
    }
    reply = httpx.post(f"{server.url}/v1/messages", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    blocks = reply.json()["content"]
    thinking = "".join(b["thinking"] for b in blocks if b["type"] == "thinking")
    assert thinking + "".join(b["text"] for b in blocks if b["type"] == "text") == expected


def test_ollama_chat_equals_transformers(setup, server, expected):
    message = {
        "role": "user",
        "content": "Text Recognition:",
        "images": [base64.b64decode(page_url(setup).split(",", 1)[1])],
    }
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=server.url, timeout=60)
    whole = client.chat(server.model, [message], options={"temperature": 0, "num_predict": STEPS})
    assert (whole.message.thinking or "") + whole.message.content == expected


def test_chat_session_turns_equal_a_fresh_greedy_run(setup):
    """Two turns about the page: the second reuses the first's cache (the image is not read
    again) and gives the tokens of a fresh greedy run over the whole conversation."""
    session = ChatSession(setup["model"], setup["processor"], max_tokens=6)
    first = [r.token for r in session.ask("Text Recognition:", images=[str(setup["image"])])]
    assert [t for t in first if t is not None] == greedy_over(
        setup, session, [str(setup["image"])], 6
    )
    second = [r.token for r in session.ask("Table Recognition:") if r.token is not None]
    assert session.tokens_processed < len(session.prompt_ids) // 2
    assert second == greedy_over(setup, session, [str(setup["image"])], 6)


def test_chat_in_the_terminal(setup):
    """`mlx-glm4v chat` on GLM-OCR: a page attached by path, then a second turn; what it prints
    is what the session in process replies."""
    child = spawn(setup["path"], "--max-tokens", "6", env={"NO_COLOR": "1"})
    child.expect(">> ")
    child.sendline(f"/image {setup['image']}")
    child.expect(r"attached page.png \(196x140, ([\d,]+) tokens\)")
    child.expect(">> ")
    child.send("Text Recognition:\r")
    child.expect(">> ")
    first = reply_in(child.before)
    child.send("Formula Recognition:\r")
    child.expect(">> ")
    second = reply_in(child.before)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    session = ChatSession(setup["model"], setup["processor"], max_tokens=6)
    shown = []
    for text, images in (
        ("Text Recognition:", [str(setup["image"])]),
        ("Formula Recognition:", []),
    ):
        display = ReplyDisplay(color=False)
        reply = "".join(display.feed(r.text) for r in session.ask(text, images))
        shown.append(reply + display.finish())
    assert [first, second] == shown
