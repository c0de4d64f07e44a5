"""GLM-OCR through the doors the other families use: `generate` on the command line, the
Python API with an image, and one request to `serve`; each reply equals transformers' greedy
generate on the same tiny checkpoint (hub layout, MTP layer appended)."""

import base64
import io
import subprocess
import sys

import pytest
from helpers import picture
from reference import ref_generate
from servers import Server

from mlx_glm4v.checkpoints.loader import load
from mlx_glm4v.generation.generate import generate

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


def test_one_server_request_equals_transformers(setup, tmp_path):
    from PIL import Image

    _, text = ref_generate(
        setup, image_message("Text Recognition:"), STEPS, images=[Image.open(setup["image"])]
    )
    buffer = io.BytesIO()
    Image.open(setup["image"]).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    server = Server(setup["path"], [], tmp_path / "server.log")
    try:
        reply = server.post(
            {
                "model": setup["path"].name,
                "max_tokens": STEPS,
                "temperature": 0,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": url}},
                            {"type": "text", "text": "Text Recognition:"},
                        ],
                    }
                ],
            }
        )
    finally:
        server.close()
    assert reply.status_code == 200, reply.text
    message = reply.json()["choices"][0]["message"]
    assert (message.get("reasoning_content") or "") + (message["content"] or "") == text
