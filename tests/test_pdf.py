"""PDFs wherever an image goes: pages rendered with pypdfium2, then images like any other.

A PDF's pages must reach the model exactly as the same renders sent as images would: the
processor's outputs are compared array for array, the CLI's reply and the servers' replies
(log-probabilities where the dialect gives them, token counts) are compared with the page
images' own. The pages differ in size, so a wrong page or a wrong DPI changes the prompt.
"""

import io
import math
import subprocess
import sys

import httpx
import numpy as np
import pypdfium2 as pdfium
import pytest
from helpers import data_url, picture, png_bytes, write_scrolling_video
from pdfs import encrypted_pdf, pages_pdf
from servers import Server

from mlx_glm4v.errors import Glm4vError
from mlx_glm4v.inputs.pdf import PdfOptions, is_pdf_file, parse_pages, render_pages
from mlx_glm4v.inputs.processor import Processor

SIZES = [(120, 90), (90, 150), (140, 100), (80, 80)]  # points; every page its own size
DPI = 100


def reference_pages(data: bytes, dpi: float) -> list:
    """The pages as pypdfium2 renders them, with nothing of ours in the way."""
    doc = pdfium.PdfDocument(data)
    return [doc[i].render(scale=dpi / 72).to_pil().convert("RGB") for i in range(len(doc))]


@pytest.fixture(scope="module")
def pdf_bytes():
    return pages_pdf(SIZES)


# ---- rendering ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dpi", [36, 72, 100, 150, 200, 300])
def test_page_sizes_at_dpi(pdf_bytes, dpi):
    """Every page is its size in points times dpi/72, rounded up as pypdfium2 rounds (the scale
    a float: 120 points at 150 dpi are 251 pixels), and pypdfium2's own pixels."""
    pages = render_pages(pdf_bytes, PdfOptions(dpi=dpi))
    scale = dpi / 72
    assert [p.size for p in pages] == [
        (math.ceil(w * scale), math.ceil(h * scale)) for w, h in SIZES
    ]
    for ours, theirs in zip(pages, reference_pages(pdf_bytes, dpi)):
        assert ours.mode == "RGB"
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_page_selection(pdf_bytes, tmp_path):
    assert parse_pages("1-3,5", 6) == [0, 1, 2, 4]
    assert parse_pages("4-", 6) == [3, 4, 5]
    assert parse_pages("2, 2,1", 6) == [1, 0]
    path = tmp_path / "doc.bin"  # found by its bytes, not its name
    path.write_bytes(pdf_bytes)
    assert is_pdf_file(path) and not is_pdf_file(tmp_path / "missing.pdf")
    pages = render_pages(path, PdfOptions(dpi=72, pages="3-,1"))
    assert [p.info["page"] for p in pages] == [3, 4, 1]
    assert [p.size for p in pages] == [SIZES[2], SIZES[3], SIZES[0]]
    for spec, words in [("0", "from 1"), ("3-2", "ascending"), ("x", "'x'"), ("9", "4 page")]:
        with pytest.raises(Glm4vError, match=words):
            render_pages(pdf_bytes, PdfOptions(pages=spec))


def test_refusals_name_the_document(pdf_bytes, tmp_path):
    cases = [
        (encrypted_pdf(), PdfOptions(), "password-protected"),
        (pdf_bytes[: len(pdf_bytes) // 2], PdfOptions(), "damaged or truncated"),
        (png_bytes(picture(20, 20)), PdfOptions(), "not a PDF"),
        (pdf_bytes, PdfOptions(max_pages=3), "4 pages selected, over the limit of 3"),
    ]
    for data, options, words in cases:
        with pytest.raises(Glm4vError) as e:
            render_pages(data, options, "scan.pdf")
        message = str(e.value)
        assert message.startswith("scan.pdf") and words in message and message.endswith(".")
    # the encrypted one is a real PDF that opens with its password
    assert pdfium.PdfDocument(encrypted_pdf(), password="secret")[0].get_size() == (200, 100)


def test_page_too_large_is_refused_before_rendering():
    """A 14,400-point page at 2,400 dpi would be 480,000 pixels a side: refused from its size in
    points, so this returns at once instead of allocating terabytes."""
    huge = io.BytesIO()
    picture(8, 8).save(huge, "PDF", resolution=1)  # 8 pixels at 1 dpi: 576 points
    with pytest.raises(Glm4vError, match=r"page 1 would be 19200x19200 = 368640000 pixels"):
        render_pages(huge.getvalue(), PdfOptions(dpi=2400), "big.pdf")


# ---- the processor and the Python API ----------------------------------------------------------


def test_processor_takes_a_pdf_as_its_pages(glm4v_checkpoint, pdf_bytes, tmp_path):
    processor = Processor.from_pretrained(glm4v_checkpoint[0])
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(pdf_bytes)
    pngs = []
    for i, page in enumerate(reference_pages(pdf_bytes, DPI)[1:3]):
        pngs.append(tmp_path / f"page{i + 2}.png")
        page.save(pngs[-1])

    def run(images, **media):
        content = [{"type": "image", "image": str(i)} for i in images]
        messages = [{"role": "user", "content": content + [{"type": "text", "text": "Read."}]}]
        return processor.process_messages(messages, media_kwargs=media)

    ours = run([pdf], dpi=DPI, pages="2-3")
    theirs = run(pngs)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert np.array_equal(ours[key], theirs[key]), key
    assert run([pdf], dpi=DPI, pages="2")["input_ids"].shape != theirs["input_ids"].shape
    with pytest.raises(Glm4vError, match="over the limit of 2"):
        run([pdf], dpi=DPI, max_pdf_pages=2)


def test_python_api_takes_a_pdf_path(glm4v_checkpoint, pdf_bytes, tmp_path):
    """`stream_generate` with a PDF among the images (or in messages), pages and DPI in
    `media_kwargs`: the reply and prompt of the page images themselves."""
    from mlx_glm4v.checkpoints.loader import load
    from mlx_glm4v.generation.generate import stream_generate

    model, processor = load(glm4v_checkpoint[0])
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(pdf_bytes)
    pages = reference_pages(pdf_bytes, DPI)

    def reply(prompt, images=(), **media):
        out = list(stream_generate(model, processor, prompt, images, max_tokens=4, **media))
        return "".join(r.text for r in out), out[-1].prompt_tokens

    theirs = reply("Read.", [pages[0], pages[3]])
    media = {"media_kwargs": {"pages": "1,4", "dpi": DPI}}
    assert reply("Read.", [str(pdf)], **media) == theirs
    message = {"role": "user", "content": [{"type": "image", "image": str(pdf)}]}
    message["content"].append({"type": "text", "text": "Read."})
    assert reply([message], **media) == theirs
    assert reply("Read.", [str(pdf)], media_kwargs={"pages": "1", "dpi": DPI})[1] < theirs[1]


# ---- the CLI -----------------------------------------------------------------------------------


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlx_glm4v.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_pdf_page_equals_its_image(glm4v_checkpoint, pdf_bytes, tmp_path):
    path = glm4v_checkpoint[0]
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(pdf_bytes)
    reference_pages(pdf_bytes, DPI)[1].save(tmp_path / "page2.png")
    common = ["generate", "--model", str(path), "-p", "Read this.", "--max-tokens", "6", "--json"]
    ours = cli(*common, "--image", str(pdf), "--pages", "2", "--pdf-dpi", str(DPI))
    theirs = cli(*common, "--image", str(tmp_path / "page2.png"))
    assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr + theirs.stderr
    import json

    ours, theirs = json.loads(ours.stdout), json.loads(theirs.stdout)
    assert ours["text"] == theirs["text"] and ours["prompt_tokens"] == theirs["prompt_tokens"]
    other = json.loads(
        cli(*common, "--image", str(pdf), "--pages", "3", "--pdf-dpi", str(DPI)).stdout
    )
    assert other["prompt_tokens"] != theirs["prompt_tokens"]

    locked = tmp_path / "locked.pdf"
    locked.write_bytes(encrypted_pdf())
    for args, words in [
        (["--image", str(locked)], "password-protected"),
        (["--image", str(pdf), "--pages", "9"], "has 4 page"),
        (["--image", str(pdf), "--max-pdf-pages", "2"], "(--max-pdf-pages)"),
        (["--image", str(pdf), "--pages", "2-1"], "ascending"),
    ]:
        out = cli(*common, *args)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_cli_checks_pdfs_before_loading_a_model(pdf_bytes, tmp_path):
    locked = tmp_path / "locked.pdf"
    locked.write_bytes(encrypted_pdf())
    missing = str(tmp_path / "no-model")
    for command in ("generate", "chat"):
        extra = ["-p", "Hi"] if command == "generate" else []
        out = cli(command, "--model", missing, "--image", str(locked), *extra)
        assert out.returncode == 1 and "password-protected" in out.stderr, out.stderr
    out = cli("generate", "--model", missing, "-p", "Hi", "--pdf-dpi", "0")
    assert out.returncode == 1 and "pdf dpi 0.0 must be" in out.stderr, out.stderr


def test_chat_attaches_a_pdf_as_pages(glm4v_checkpoint, pdf_bytes, tmp_path):
    """`/image doc.pdf` (and `--image`): one attachment per page, measured as its image."""
    from mlx_glm4v.terminal import attach

    processor = Processor.from_pretrained(glm4v_checkpoint[0])
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(pdf_bytes)
    pages = reference_pages(pdf_bytes, DPI)
    pages[3].save(tmp_path / "page4.png")
    got = attach(processor, str(pdf), "image", {"dpi": DPI, "pages": "2,4"})
    assert [a.name for a in got] == ["doc.pdf page 2", "doc.pdf page 4"]
    assert [a.size for a in got] == [pages[1].size, pages[3].size]
    (image,) = attach(processor, str(tmp_path / "page4.png"), "image", {})
    assert got[1].tokens == image.tokens and got[0].tokens != image.tokens
    assert np.array_equal(np.asarray(got[1].source), np.asarray(pages[3]))


def test_chat_image_command_takes_a_pdf(glm4v_checkpoint, pdf_bytes, tmp_path):
    """`/image doc.pdf` in the real terminal: each selected page attached and measured, and the
    reply the one the same pages give as images in-process."""
    from mlx_glm4v.checkpoints.loader import load

    pexpect = pytest.importorskip("pexpect")
    from test_terminal import MAX_TOKENS, expected_replies, reply_in, spawn

    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(pdf_bytes)
    path = glm4v_checkpoint[0]
    args = ["--max-tokens", str(MAX_TOKENS), "--pdf-dpi", str(DPI), "--pages", "2,4"]
    child = spawn(path, *args, env={"NO_COLOR": "1"})
    child.expect(">> ")
    child.sendline(f"/image {pdf}")
    pages = reference_pages(pdf_bytes, DPI)
    for n in (2, 4):
        w, h = pages[n - 1].size
        child.expect(rf"attached doc.pdf page {n} \({w}x{h}, [\d,]+ tokens\)")
    child.expect(">> ")
    child.sendline("Read them.")
    child.expect(">> ")
    reply = reply_in(child.before)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    model, processor = load(path)
    setup = {"model": model, "processor": processor}
    assert [reply] == expected_replies(setup, [("Read them.", [pages[1], pages[3]], [])])


# ---- the servers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(glm4v_checkpoint, tmp_path_factory):
    server = Server(
        glm4v_checkpoint[0],
        ["--pdf-dpi", str(DPI), "--max-pdf-pages", "3", "--max-video-frames", "16"]
        + ["--max-images", "4"],
        tmp_path_factory.mktemp("pdf") / "server.log",
    )
    yield server
    server.close()


def b64(data: bytes) -> str:
    return data_url(data, "application/pdf").split(",", 1)[1]


def image_parts(data: bytes, pages, dpi=DPI) -> list:
    rendered = reference_pages(data, dpi)
    return [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(rendered[p - 1]))}}
        for p in pages
    ]


def chat(server, parts, **extra):
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": parts + [{"type": "text", "text": "Read."}]}],
        "temperature": 0,
        "max_tokens": 6,
        "logprobs": True,
        **extra,
    }
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)


def chat_reply(response) -> tuple:
    assert response.status_code == 200, response.text
    body = response.json()
    tokens = [(t["token"], t["logprob"]) for t in body["choices"][0]["logprobs"]["content"]]
    return body["choices"][0]["message"]["content"], tokens, body["usage"]["prompt_tokens"]


def test_chat_completions_file_part(server, pdf_bytes):
    file = {"file_data": data_url(pdf_bytes, "application/pdf"), "filename": "doc.pdf"}
    ours = chat_reply(chat(server, [{"type": "file", "file": file, "pages": "2-3"}]))
    assert ours == chat_reply(chat(server, image_parts(pdf_bytes, [2, 3])))
    # bare base64 is a PDF too; a PDF in an image_url part is its pages
    bare = {"type": "file", "file": {"file_data": b64(pdf_bytes)}, "pages": "2-3"}
    assert chat_reply(chat(server, [bare])) == ours
    three = pages_pdf(SIZES[:3])
    url = {"type": "image_url", "image_url": {"url": data_url(three, "application/pdf")}}
    assert chat_reply(chat(server, [url])) == chat_reply(
        chat(server, image_parts(three, [1, 2, 3]))
    )
    # per-request DPI, within --pdf-dpi
    low = {"type": "file", "file": file, "pages": "2", "dpi": 50}
    assert chat_reply(chat(server, [low])) == chat_reply(
        chat(server, image_parts(pdf_bytes, [2], dpi=50))
    )
    budget = {"mm_processor_kwargs": {"dpi": 50}}
    part = {"type": "file", "file": file, "pages": "2"}
    assert chat_reply(chat(server, [part], **budget)) == chat_reply(chat(server, [low]))


def test_responses_input_file(server, pdf_bytes):
    def ask(parts):
        body = {
            "model": server.model,
            "input": [{"role": "user", "content": parts + [{"type": "input_text", "text": "Hi"}]}],
            "temperature": 0,
            "max_output_tokens": 6,
        }
        response = httpx.post(f"{server.url}/v1/responses", json=body, timeout=120)
        assert response.status_code == 200, response.text
        out = response.json()
        return out["output"][-1]["content"][0]["text"], out["usage"]["input_tokens"]

    file = {"type": "input_file", "file_data": data_url(pdf_bytes, "application/pdf")}
    ours = ask([{**file, "filename": "doc.pdf", "pages": "1,3"}])
    images = [
        {"type": "input_image", "image_url": p["image_url"]["url"]}
        for p in image_parts(pdf_bytes, [1, 3])
    ]
    assert ours == ask(images)
    assert ask([{**file, "pages": "1"}])[1] != ours[1]


def test_anthropic_document_block(server, pdf_bytes):
    def ask(blocks):
        body = {
            "model": server.model,
            "max_tokens": 6,
            "temperature": 0,
            "messages": [{"role": "user", "content": blocks + [{"type": "text", "text": "Hi"}]}],
        }
        response = httpx.post(f"{server.url}/v1/messages", json=body, timeout=120)
        assert response.status_code == 200, response.text
        out, usage = response.json(), response.json()["usage"]
        # the prompt: tokens read now and those the prefix cache held
        tokens = usage["input_tokens"] + (usage.get("cache_read_input_tokens") or 0)
        return out["content"][-1]["text"], tokens

    source = {"type": "base64", "media_type": "application/pdf", "data": b64(pdf_bytes)}
    ours = ask([{"type": "document", "source": source, "pages": "3"}])
    png = png_bytes(reference_pages(pdf_bytes, DPI)[2])
    image = {"type": "base64", "media_type": "image/png", "data": b64(png)}
    assert ours == ask([{"type": "image", "source": image}])
    assert ask([{"type": "document", "source": source, "pages": "4"}])[1] != ours[1]
    # a plain-text document is text
    text = {"type": "text", "media_type": "text/plain", "data": "Hi"}
    assert ask([{"type": "document", "source": text}])[1] < ours[1]


BAD = {
    "encrypted": (encrypted_pdf(), None, "password-protected"),
    "truncated": (pages_pdf(SIZES)[:900], None, "damaged or truncated"),
    "too many pages": (pages_pdf(SIZES), None, "4 pages selected, over the limit"),
    "not a PDF": (png_bytes(picture(30, 30)), None, "not a PDF"),
    "page out of range": (pages_pdf(SIZES), "7", "the PDF has 4 page(s)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_pdfs_are_refused_in_each_dialect(server, case):
    data, pages, words = BAD[case]
    url, raw = data_url(data, "application/pdf"), b64(data)
    extra = {"pages": pages} if pages else {}
    requests = {
        "/v1/chat/completions": (
            {
                "model": server.model,
                "max_tokens": 2,
                "messages": [
                    {"role": "user", "content": [{"type": "file", "file": {"file_data": url}}]}
                ],
            },
            "messages[0].content[0]",
        ),
        "/v1/responses": (
            {
                "model": server.model,
                "max_output_tokens": 2,
                "input": [{"role": "user", "content": [{"type": "input_file", "file_data": url}]}],
            },
            "input[0].content[0]",
        ),
        "/v1/messages": (
            {
                "model": server.model,
                "max_tokens": 2,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "document",
                                "source": {
                                    "type": "base64",
                                    "media_type": "application/pdf",
                                    "data": raw,
                                },
                            }
                        ],
                    }
                ],
            },
            "messages[0].content[0]",
        ),
    }
    for path, (body, where) in requests.items():
        part = body.get("messages", body.get("input"))[0]["content"][0]
        part.update(extra)
        response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
        assert response.status_code == 400, (path, response.text)
        error = response.json()
        if path == "/v1/messages":
            assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
            message = error["error"]["message"]
        else:
            message = error["error"]["message"]
            assert error["error"]["param"] == where, error
        assert message.startswith(where) and words in message, (path, message)
        assert message.endswith(".") and "\n" not in message
    assert chat_reply(chat(server, []))[0] is not None  # still serving


def test_file_ids_and_urls_are_refused_not_dropped(server):
    cases = [
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}
                ]
            },
            "file_id is not supported",
        ),
        (
            "/v1/responses",
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "file_id is not supported",
        ),
        (
            "/v1/responses",
            {
                "input": [
                    {
                        "role": "user",
                        "content": [{"type": "input_file", "file_url": "https://e.com/a.pdf"}],
                    }
                ]
            },
            "--allow-url-fetch",
        ),
        (
            "/v1/messages",
            {
                "max_tokens": 2,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "document", "source": {"type": "file", "file_id": "f"}}
                        ],
                    }
                ],
            },
            "file sources are not supported",
        ),
        (
            "/v1/messages",
            {
                "max_tokens": 2,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "document", "source": {"type": "url", "url": "https://e/a"}}
                        ],
                    }
                ],
            },
            "--allow-url-fetch",
        ),
    ]
    for path, body, words in cases:
        response = httpx.post(
            f"{server.url}{path}", json={"model": server.model, **body}, timeout=60
        )
        assert response.status_code == 400, response.text
        assert words in response.text, response.text


def test_media_budget_within_the_operators_caps(server, pdf_bytes, tmp_path):
    parts = image_parts(pdf_bytes, [3])
    whole = chat_reply(chat(server, parts))
    small = chat_reply(chat(server, parts, mm_processor_kwargs={"max_pixels": 28 * 28 * 4}))
    assert small[2] < whole[2]
    large = chat_reply(chat(server, parts, mm_processor_kwargs={"min_pixels": 28 * 28 * 400}))
    assert large[2] > whole[2]
    for budget, status, words in [
        ({"dpi": 300}, 400, "mm_processor_kwargs.dpi 300 is over this server's limit of 100"),
        ({"max_frames": 64}, 400, "over this server's limit of 16 (--max-video-frames)"),
        ({"min_pixels": 900, "max_pixels": 800}, 400, "min_pixels 900 is over max_pixels 800"),
        ({"max_pixels": -1}, 400, "mm_processor_kwargs.max_pixels"),
        ({"tokens": 3}, 400, "unknown field 'mm_processor_kwargs.tokens'"),
    ]:
        response = chat(server, parts, mm_processor_kwargs=budget)
        assert response.status_code == status and words in response.text, response.text
    # a video's frames: the request's fps and max_frames, the frames counted against the cap
    clip = write_scrolling_video(tmp_path / "clip.mp4", frames=40, fps=8)  # 5 s
    video = [{"type": "video_url", "video_url": {"url": data_url(clip.read_bytes(), "video/mp4")}}]
    plain = chat_reply(chat(server, video))[2]  # 2 fps: 10 frames
    assert chat_reply(chat(server, video, mm_processor_kwargs={"fps": 1}))[2] < plain
    assert chat_reply(chat(server, video, mm_processor_kwargs={"max_frames": 2}))[2] < plain
    response = chat(server, video, mm_processor_kwargs={"fps": 8})  # 40 frames
    assert response.status_code == 400 and "(--max-video-frames)" in response.text, response.text
    file = {"type": "file", "file": {"file_data": data_url(pdf_bytes, "application/pdf")}}
    response = chat(server, [{**file, "dpi": 150, "pages": "1"}])
    assert response.status_code == 400 and "(--pdf-dpi)" in response.text, response.text
    # pages of all documents count together against --max-pdf-pages
    response = chat(server, [{**file, "pages": "1-2"}, {**file, "pages": "3-4"}])
    assert response.status_code == 400 and "--max-pdf-pages" in response.text, response.text


def test_pdf_pages_count_as_images_against_max_images(server, pdf_bytes):
    """Each page is an image to the model: a request's pages and images together stay within
    --max-images (4 here), the part that passes it named."""
    file = {"type": "file", "file": {"file_data": data_url(pdf_bytes, "application/pdf")}}
    pages, image = {**file, "pages": "1-3"}, image_parts(pdf_bytes, [1])[0]
    assert chat(server, [pages, image]).status_code == 200  # 3 pages and an image: 4
    after = chat(server, [pages, image, image])
    assert after.status_code == 400, after.text
    message = after.json()["error"]["message"]
    assert message.startswith("messages[0].content[2]: one image more")
    assert "this server's --max-images (4 a request" in message
    before = chat(server, [image, image, pages])  # 2 images left for 3 pages
    assert before.status_code == 400, before.text
    message = before.json()["error"]["message"]
    assert message.startswith("messages[0].content[2]: 3 pages selected, over the limit of 2")
    assert "--max-images, 4 a request" in message and "Traceback" not in message
    assert chat(server, [image, image, {**file, "pages": "1-2"}]).status_code == 200


@pytest.mark.distributed
def test_chat_pdf_pages_on_two_ranks(glm4v_checkpoint, pdf_bytes, tmp_path):
    """Under mlx.launch, chat's rendered pages reach the other rank (as lossless PNG) and the
    turn runs in step there: the reply is the one a single process gives."""
    from ranks import cli_env, mlx_launch

    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(pdf_bytes)
    command = [sys.executable, "-m", "mlx_glm4v", "chat", "-m", str(glm4v_checkpoint[0])]
    command += ["--max-tokens", "6", "--pdf-dpi", str(DPI), "--pages", "2"]

    def run(launcher):
        out = subprocess.run(
            [*launcher, *command, "--image", str(pdf)],
            input="Read it.\n/exit\n",
            capture_output=True,
            text=True,
            env=cli_env(tmp_path),
            cwd=tmp_path,
            timeout=300,
        )
        assert out.returncode == 0 and "error" not in out.stderr, out.stderr[-2000:]
        assert "attached doc.pdf page 2" in out.stdout + out.stderr
        return out.stdout

    assert run([*mlx_launch(2), "--"]) == run([])
