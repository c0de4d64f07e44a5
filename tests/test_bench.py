"""The benchmark's code, kept working: a tiny checkpoint, a few tokens, one round. Not a timed test.

CI's environment has no mlx-vlm, so there the benchmark runs ours alone; that path is asserted
as such (our rows present, no mlx-vlm rows, the note saying so), not skipped. Where mlx-vlm is
installed, its rows and the ratios are asserted too.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench  # noqa: E402
import make_checkpoint  # noqa: E402

HAVE_MLX_VLM = importlib.util.find_spec("mlx_vlm") is not None


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return make_checkpoint.build(tmp_path_factory.mktemp("bench-ckpt"), "tiny")


def test_checkpoint_has_transformers_layout(tiny_checkpoint):
    """Every tensor transformers' Glm4vForConditionalGeneration has, with its shape, and no other;
    transformers reads the config and processor files (published layout) as GLM-4.1V's."""
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from transformers import AutoConfig, AutoProcessor, Glm4vForConditionalGeneration

    config = AutoConfig.from_pretrained(tiny_checkpoint)
    with torch.device("meta"):
        reference = Glm4vForConditionalGeneration(config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    with safe_open(str(tiny_checkpoint / "model.safetensors"), "np") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert found == expected
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    assert type(processor).__name__ == "Glm4vProcessor"
    assert config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image|>")


def test_checkpoint_with_a_larger_vocabulary(tmp_path):
    """--vocab gives the embedding and head more rows than the tokenizer has tokens (the
    published 151,552 in the fine-tuning benchmark); transformers' model of that config has the
    same tensors, the special tokens keep ids inside it, and a vocabulary smaller than the
    tokenizer is refused."""
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer, Glm4vForConditionalGeneration

    path = make_checkpoint.build(tmp_path / "ckpt", "tiny", vocab=1024)
    config = AutoConfig.from_pretrained(path)
    assert config.text_config.vocab_size == 1024
    with torch.device("meta"):
        reference = Glm4vForConditionalGeneration(config)
    with safe_open(str(path / "model.safetensors"), "np") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert found == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert 300 < len(tokenizer) < 1024
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image|>")
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        make_checkpoint.build(tmp_path / "small", "tiny", vocab=100)


def test_checkpoint_loads_and_never_stops_early(tiny_checkpoint):
    from mlx_glm4v.checkpoints.loader import load
    from mlx_glm4v.generation.generate import stream_generate

    model, processor = load(str(tiny_checkpoint))
    image = tiny_checkpoint / "probe.png"
    bench.make_image(image, 112, 84, 0)
    # end-of-sequence tokens are never chosen, so the run without --ignore-eos goes the full length
    out = list(
        stream_generate(
            model, processor, "Describe this image in detail.", [str(image)], max_tokens=12
        )
    )
    assert out[-1].generation_tokens == 12 and out[-1].finish_reason == "length"
    assert out[-1].prompt_tokens > 12


def test_decode_weight_bytes_counts_text_decoder_and_lm_head(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    shapes = make_checkpoint.tensor_shapes(config)
    decoder = ("lm_head.weight", "model.language_model.norm.weight")
    text = sum(
        4 * math.prod(s)
        for k, s in shapes.items()
        if k.startswith("model.language_model.layers.") or k in decoder
    )
    assert bench.decode_weight_bytes(tiny_checkpoint) == text


@pytest.mark.slow
def test_bench_tiny(tmp_path, capsys):
    out = tmp_path / "results.json"
    results = bench.main(
        [
            "--tiny",
            "--work",
            str(tmp_path / "work"),
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--json-out",
            str(out),
        ]
    )
    printed = capsys.readouterr()
    assert json.loads(out.read_text())["max_tokens"] == 4

    cases = results["cases"]
    assert set(cases) == {"image-f32", "image-bf16", "image-4bit", "multi-image", "video"}
    for case, tools in cases.items():
        ours = tools["mlx-glm4v"]
        assert "error" not in ours, (case, ours)
        assert ours["generation_tokens"] == 4 and ours["prompt_tokens"] > 4
        assert ours["prompt_tps"] > 0 and ours["generation_tps"] > 0 and ours["wall_s"] > 0
        assert ours["max_rss_gb"] > 0 and ours["roofline_pct"] > 0
        assert f"| {case} | mlx-glm4v |" in printed.out
    assert (
        cases["video"]["mlx-glm4v"]["prompt_tokens"]
        > cases["image-f32"]["mlx-glm4v"]["prompt_tokens"]
    )
    assert "mlx-vlm" not in cases["video"]  # mlx-vlm has no native GLM-4.1V video: ours alone

    session = results["session"]
    assert "error" not in session, session
    assert session["first"]["ttft_s"] > 0 and session["second"]["prompt_tokens_run"] > 0
    assert "Second question" in printed.out
    assert results["stages"]["mlx-glm4v"]["ttft_s"] > 0
    assert set(results["roofline"]["gb_per_s"]) == {"float32", "bfloat16", "4bit"}

    if HAVE_MLX_VLM:
        for case in ("image-f32", "image-bf16", "image-4bit", "multi-image"):
            theirs = cases[case]["mlx-vlm"]
            assert "error" not in theirs, (case, theirs)
            assert theirs["generation_tokens"] == 4
            assert theirs["prompt_tokens"] == cases[case]["mlx-glm4v"]["prompt_tokens"]
        assert "Ratios ours / mlx-vlm" in printed.out
        assert "identical" in results["stages"]["tokens_match"]
        ab = results["ab"]
        assert "error" not in ab, ab
        assert ab["tokens"] == {"mlx-glm4v": 4, "mlx-vlm": 4}
        assert all(
            ab[tool]["prompt_s"] > 0 and ab[tool]["vision_cpu_s"] > 0
            for tool in ("mlx-glm4v", "mlx-vlm")
        )
        assert "Both tools in one process" in printed.out
    else:
        # the explicit ours-only path: no mlx-vlm rows, no ratios, and the run says why
        assert all(set(tools) == {"mlx-glm4v"} for tools in cases.values())
        assert "Ratios" not in printed.out
        assert "mlx-vlm is not installed" in printed.err
        assert "ab" not in results and any(
            n.startswith("ab: needs mlx-vlm") for n in results["notes"]
        )


@pytest.mark.slow  # about 40 s: four processes (the SDK, a server, the ocr command)
def test_the_documents_benchmark_runs(tmp_path):
    """benchmarks/documents_bench.py end to end on the tests' checkpoint: the SDK with our server,
    then `mlx-glm4v ocr`, on 2 pages; both read the same regions into the same Markdown."""
    pytest.importorskip("glmocr")
    out = tmp_path / "r.json"
    run = subprocess.run(
        [sys.executable, str(BENCH / "documents_bench.py"), "--tiny", "--backend", "ours"]
        + ["--pages", "2", "--max-tokens", "2", "--work", str(tmp_path), "--json-out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["same_markdown"] and result["ours"]["regions"] == result["sdk"]["regions"] > 2
    assert result["ours"]["peak_rss_mb"] > 0 and result["sdk"]["server_rss_mb"] > 0
