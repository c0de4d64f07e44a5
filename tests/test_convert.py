"""Conversion and quantization (issue #5), from a tiny float32 checkpoint transformers wrote.

Each conversion is loaded and run on an image prompt. Its logits must equal, bit for bit, those
of the source model cast and quantized the same way in memory (so writing and reading lose
nothing), and come close to the float32 transformers reference: a minimum cosine similarity
over positions, since bfloat16 and quantized weights cannot be exact.

The checkpoint here uses transformers' default init range for the text weights (0.02), not the
wider one of the shared fixture: that one is so ill-conditioned that transformers itself, run in
bfloat16, only reaches a cosine similarity of 0.9996 to its float32 logits.

Checkpoints laid out as mlx-vlm writes them are built here by renaming keys and moving
convolutions channels-last, as mlx-vlm's own `sanitize` does.
"""

import importlib
import json
import re
import shutil
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import tiny
import torch
from helpers import picture
from reference import our_inputs, prepare, user
from typer.testing import CliRunner

from mlx_glm4v.checkpoints.loader import load, load_model
from mlx_glm4v.cli import app
from mlx_glm4v.errors import Glm4vError

# the module: the package's `convert` is the function
conversion = importlib.import_module("mlx_glm4v.checkpoints.convert")

# case -> (convert options, minimum cosine similarity of the logits at any position)
CASES = {
    "bfloat16": (dict(dtype="bfloat16"), 0.9999),
    "8-bit": (dict(quantize=True, q_bits=8, dtype="bfloat16"), 0.999),
    "mixed_4_8": (dict(quant_recipe="mixed_4_8", q_group_size=32, dtype="bfloat16"), 0.90),
    "4-bit": (dict(quantize=True, q_bits=4, q_group_size=32, dtype="bfloat16"), 0.90),
    "4-bit, vision too": (
        dict(quantize=True, q_group_size=32, quantize_vision=True, dtype="bfloat16"),
        0.90,
    ),
}

# case -> {layer: bits, or None where it must stay in floats}
LAYERS = {
    "8-bit": {  # group 64 does not divide 96: the text down_proj and the merger's stay in floats
        "language_model.embed_tokens": 8,
        "lm_head": 8,
        "language_model.layers.0.self_attn.q_proj": 8,
        "language_model.layers.0.mlp.gate_up_proj": 8,
        "language_model.layers.0.mlp.down_proj": None,
        "visual.merger.down_proj": None,
        "visual.blocks.0.attn.qkv": None,
        "visual.merger.gate_proj": None,
    },
    # 2 layers: layer 1 is in the last eighth, so its v_proj and down_proj get 8 bits
    "mixed_4_8": {
        "language_model.embed_tokens": 8,
        "lm_head": 8,
        "language_model.layers.0.self_attn.v_proj": 4,
        "language_model.layers.1.self_attn.v_proj": 8,
        "language_model.layers.0.mlp.down_proj": 4,
        "language_model.layers.1.mlp.down_proj": 8,
        "language_model.layers.1.mlp.gate_up_proj": 4,
        "visual.blocks.0.attn.qkv": None,
    },
    "4-bit": {
        "language_model.layers.0.mlp.down_proj": 4,
        "language_model.layers.1.self_attn.o_proj": 4,
        "visual.blocks.0.attn.qkv": None,
        "visual.merger.proj": None,
    },
    "4-bit, vision too": {
        "visual.blocks.0.attn.qkv": 4,
        "visual.blocks.1.mlp.down_proj": 4,
        "visual.merger.down_proj": 4,
        "visual.merger.proj": 4,
        "language_model.layers.0.mlp.down_proj": 4,
    },
}


def run(model, inputs) -> np.ndarray:
    return np.array(model(**our_inputs(inputs)).astype(mx.float32))


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = (
        a.reshape(-1, a.shape[-1]).astype(np.float64),
        b.reshape(-1, b.shape[-1]).astype(np.float64),
    )
    return float(
        ((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min()
    )


def all_tensors(path) -> dict:
    out = {}
    for f in path.glob("*.safetensors"):
        out.update(mx.load(str(f)))
    return out


def disk_size(path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def bits_of(model, path):
    module = dict(model.named_modules())[path]
    return module.bits if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)) else None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny GLM-4.1V checkpoint as conftest's, but with text weights at transformers' default
    init range."""
    path = tmp_path_factory.mktemp("glm4v-tiny-default-init")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny, "TEXT_INIT_RANGE", 0.02)
        model, processor = tiny.build_checkpoint(path, max_shard_size="400KB")
    return path, model, processor


@pytest.fixture(scope="module")
def source(checkpoint):
    """(checkpoint path, image-prompt inputs, float32 reference logits)."""
    path, ref, processor = checkpoint
    inputs = prepare(processor, [user("image", "Describe this image.")], images=[picture(200, 300)])
    with torch.no_grad():
        logits = ref(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
    return path, inputs, logits


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """case -> output directory, every case of CASES converted once (the 8-bit one through the
    CLI)."""
    src = source[0]
    root = tmp_path_factory.mktemp("converted")
    outs = {}
    for i, (name, (options, _)) in enumerate(CASES.items()):
        outs[name] = root / f"case{i}"
        if name == "8-bit":
            args = [
                "convert",
                "--hf-path",
                str(src),
                "--mlx-path",
                str(outs[name]),
                "-q",
                "--q-bits",
                "8",
                "--dtype",
                "bfloat16",
            ]
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, result.output
            assert "bits per weight" in result.stdout
        else:
            conversion.convert(str(src), str(outs[name]), **options)
    return outs


def in_memory(src, options):
    """The source model cast and quantized as `options` ask, without writing anything."""
    model = load_model(src, dtype=getattr(mx, options["dtype"]))
    if options.get("quantize") or options.get("quant_recipe"):
        plan = conversion.quantization_options(
            options.get("q_bits"),
            options.get("q_group_size"),
            "affine",
            options.get("quant_recipe"),
            options.get("quantize_vision", False),
        )
        plan = replace(plan, num_layers=len(model.layers))
        nn.quantize(
            model, class_predicate=lambda path, module: plan.settings(path, module) or False
        )
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_conversion_loads_and_runs_close_to_reference(case, source, converted):
    src, inputs, ref_logits = source
    model = load_model(converted[case])
    logits = run(model, inputs)
    np.testing.assert_array_equal(logits, run(in_memory(src, CASES[case][0]), inputs))
    cosine = min_cosine(logits, ref_logits)
    assert cosine >= CASES[case][1], f"{case}: min cosine similarity {cosine:.6f}"
    for path, bits in LAYERS.get(case, {}).items():
        assert bits_of(model, path) == bits, (
            f"{case}: {path} has {bits_of(model, path)} bits, expected {bits}"
        )
    modules = dict(model.named_modules())
    assert isinstance(modules["visual.patch_embed.proj"], nn.Conv3d)
    assert isinstance(modules["visual.downsample"], nn.Conv2d)
    assert type(modules["visual.embeddings.position_embedding"]) is nn.Embedding
    print(f"{case:20s} min cosine {cosine:.6f}  {disk_size(converted[case]):>8d} bytes")


def test_weights_shrink_with_bits(converted):
    sizes = [disk_size(converted[case]) for case in CASES]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), dict(
        zip(CASES, sizes)
    )


def test_quantization_recorded_as_mlx_lm_does(converted):
    config = json.loads((converted["mixed_4_8"] / "config.json").read_text())
    q = config["quantization"]
    assert config["quantization_config"] == q
    assert {k: q[k] for k in ("group_size", "bits", "mode")} == {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
    }
    assert (
        q["lm_head"]
        == q["language_model.embed_tokens"]
        == {"group_size": 32, "bits": 8, "mode": "affine"}
    )
    assert "language_model.layers.0.self_attn.v_proj" not in q  # at the global settings: no entry
    config = json.loads((converted["8-bit"] / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert config["dtype"] == "bfloat16"
    assert "quantization" not in json.loads((converted["bfloat16"] / "config.json").read_text())


def test_float32_copy_is_exact_and_complete(source, checkpoint, tmp_path, monkeypatch):
    """dtype kept, our names and layouts, sharded with an index, side files copied, loads with
    its processor."""
    import mlx_glm4v

    src, inputs, _ = source
    monkeypatch.setattr(conversion, "MAX_SHARD_BYTES", 400_000)
    out = mlx_glm4v.convert(str(src), str(tmp_path / "f32"))
    model, processor = load(str(out))
    np.testing.assert_array_equal(run(model, inputs), run(load_model(src), inputs))

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 3 and {s.name for s in shards} == set(index["weight_map"].values())
    assert all(s.name.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    stored = {}
    for s in shards:
        tensors = mx.load(str(s))
        assert sum(v.nbytes for v in tensors.values()) <= 400_000
        stored.update(tensors)
    assert sorted(stored) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in stored.values())
    assert stored["visual.patch_embed.proj.weight"].shape == (64, 2, 14, 14, 3)  # channels-last
    assert stored["visual.downsample.weight"].shape == (128, 2, 2, 64)
    assert all(v.dtype == mx.float32 for v in stored.values())
    assert all(k.split(".")[0] in ("visual", "language_model", "lm_head") for k in stored)

    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
        "generation_config.json",
    ):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert "mlx-glm4v" in (out / "README.md").read_text()
    conversation = user("image", "hi")
    assert processor.apply_chat_template(conversation) == checkpoint[2].apply_chat_template(
        conversation, add_generation_prompt=True
    )
    assert not list(tmp_path.glob(".*"))  # no temporary sibling left


def mlx_vlm_name(key: str) -> str:
    """Our tensor or module name as mlx-vlm's glm4v stores it."""
    for ours, theirs in (
        ("visual.", "vision_tower."),
        ("language_model.", "language_model.model."),
        ("lm_head", "language_model.lm_head"),
    ):
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return key


def as_mlx_vlm(ours, out, tensors: dict):
    """Write `tensors` (mlx-vlm names) as one model.safetensors beside `ours`' other files, with
    the per-layer quantization entries renamed and without `mode`, as mlx-vlm's recipes write
    them."""
    shutil.copytree(ours, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    mx.save_safetensors(str(out / "model.safetensors"), tensors, metadata={"format": "mlx"})
    config = json.loads((out / "config.json").read_text())
    if "quantization" in config:
        q = {
            mlx_vlm_name(k): (
                {kk: vv for kk, vv in v.items() if kk != "mode"} if isinstance(v, dict) else v
            )
            for k, v in config["quantization"].items()
        }
        config["quantization"] = config["quantization_config"] = q
    (out / "config.json").write_text(json.dumps(config))


def test_mlx_vlm_float_layout_loads_exactly(source, tmp_path):
    src, inputs, _ = source
    hf = load_model(src)  # tensors under our names, read from transformers' layout
    tensors = {}
    for key, value in all_tensors(src).items():
        key = key.replace("model.visual.", "vision_tower.").replace(
            "model.language_model.", "language_model.model."
        )
        key = "language_model.lm_head.weight" if key == "lm_head.weight" else key
        if key.endswith(("patch_embed.proj.weight", "downsample.weight")):
            # mlx-vlm stores convolutions channels-last
            value = value.transpose(0, *range(2, value.ndim), 1)
        tensors[key] = value
    assert (
        any(k.startswith("vision_tower.") for k in tensors)
        and "language_model.lm_head.weight" in tensors
    )
    as_mlx_vlm(src, tmp_path / "vlm", tensors)
    np.testing.assert_array_equal(run(load_model(tmp_path / "vlm"), inputs), run(hf, inputs))


def test_mlx_vlm_quantized_layout_loads_exactly(source, converted, tmp_path):
    _, inputs, _ = source
    ours = converted["mixed_4_8"]
    as_mlx_vlm(ours, tmp_path / "vlm", {mlx_vlm_name(k): v for k, v in all_tensors(ours).items()})
    config = json.loads((tmp_path / "vlm" / "config.json").read_text())
    assert config["quantization"]["language_model.lm_head"] == {"group_size": 32, "bits": 8}
    theirs, mine = load_model(tmp_path / "vlm"), load_model(ours)
    np.testing.assert_array_equal(run(theirs, inputs), run(mine, inputs))
    for path in LAYERS["mixed_4_8"]:
        assert bits_of(theirs, path) == bits_of(mine, path), path


def test_quantized_checkpoint_reconverts_and_dequantizes(source, converted, tmp_path):
    _, inputs, _ = source
    q8 = converted["8-bit"]
    quantized = run(load_model(q8), inputs)

    again = conversion.convert(str(q8), str(tmp_path / "again"))
    assert json.loads((again / "config.json").read_text())["quantization"]["bits"] == 8
    np.testing.assert_array_equal(run(load_model(again), inputs), quantized)

    floats = conversion.convert(str(q8), str(tmp_path / "floats"), dequantize=True, dtype="float32")
    assert "quantization" not in json.loads((floats / "config.json").read_text())
    model = load_model(floats)
    assert not any(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()
    )
    assert min_cosine(run(model, inputs), run(load_model(q8, mx.float32), inputs)) >= 0.999999

    with pytest.raises(Glm4vError, match="already quantized"):
        conversion.convert(str(q8), str(tmp_path / "twice"), quantize=True)
    with pytest.raises(Glm4vError, match="nothing to --dequantize"):
        conversion.convert(str(source[0]), str(tmp_path / "none"), dequantize=True)


def test_interrupted_conversion_leaves_nothing(source, tmp_path, monkeypatch):
    src = source[0]

    def disk_full(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(conversion, "_save_shard", disk_full)
    with pytest.raises(OSError, match="No space"):
        conversion.convert(str(src), str(tmp_path / "out"), quantize=True)
    assert list(tmp_path.iterdir()) == []

    old = tmp_path / "old"  # a --force run that fails leaves the previous output as it was
    old.mkdir()
    (old / "keep.txt").write_text("previous")
    with pytest.raises(OSError, match="No space"):
        conversion.convert(str(src), str(old), force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (
        old / "keep.txt"
    ).read_text() == "previous"


def test_existing_output_needs_force(source, tmp_path):
    src = source[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "something.txt").write_text("mine")
    with pytest.raises(Glm4vError, match="not empty; pass --force"):
        conversion.convert(str(src), str(out))
    assert (out / "something.txt").exists()
    conversion.convert(str(src), str(out), force=True)
    assert not (out / "something.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(Glm4vError, match="holds the source checkpoint"):
        conversion.convert(str(src), str(src), force=True)


@pytest.mark.parametrize(
    "options, message",
    [
        (["-q", "--q-bits", "7"], "--q-bits 7 is not supported"),
        (["-q", "--q-group-size", "48"], "--q-group-size 48 is not supported"),
        (["-q", "--q-mode", "int4"], "--q-mode 'int4' is not one of"),
        (["-q", "--q-mode", "mxfp4", "--q-bits", "8"], "--q-mode mxfp4 fixes"),
        (["--quant-recipe", "mixed_6_4"], "--quant-recipe 'mixed_6_4' is not"),
        (["--q-bits", "8"], "need -q"),
        (["--dtype", "int8"], "--dtype 'int8' is not one of"),
        (["-q", "--dequantize"], "exclude each other"),
    ],
)
def test_bad_options_are_one_line_errors(source, tmp_path, options, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["convert", "--hf-path", str(source[0]), "--mlx-path", str(out), *options]
    )
    assert result.exit_code == 1
    assert (
        result.stderr.count("\n") == 1
        and result.stderr.startswith("error: ")
        and message in result.stderr
    )
    assert not out.exists()


def test_float16_warns(source, tmp_path):
    with pytest.warns(UserWarning, match="overflow in float16.*bfloat16"):
        out = conversion.convert(str(source[0]), str(tmp_path / "f16"), dtype="float16")
    assert mx.load(str(out / "model.safetensors"))["lm_head.weight"].dtype == mx.float16


def test_readme_says_what_float16_does(source, tmp_path):
    """float16 is written, with a one-line warning; the README says so (it said float16 was
    refused)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Convert and quantize")[1].split("\n## ")[0]
    assert (
        "float16 is written with a warning" in " ".join(section.split())
        and "refused" not in section
    )
    out = tmp_path / "f16"
    result = CliRunner().invoke(
        app, ["convert", "--hf-path", str(source[0]), "--mlx-path", str(out), "--dtype", "float16"]
    )
    assert result.exit_code == 0, result.output
    assert (
        result.stderr.startswith("warning: GLM-4 models overflow in float16")
        and result.stderr.count("\n") == 1
    )
    assert mx.load(str(out / "model.safetensors"))["lm_head.weight"].dtype == mx.float16


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_respects_the_umask(source, tmp_path, umask):
    """The output's modes are those of any directory and file the user makes (not mkdtemp's
    0700)."""
    import os
    import stat

    previous = os.umask(umask)
    try:
        out = conversion.convert(str(source[0]), str(tmp_path / "out"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = sorted(out.iterdir())
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask for f in files)


def test_converted_directory_runs_generate(converted, tmp_path):
    import subprocess
    import sys

    image = tmp_path / "picture.png"
    picture(90, 120).save(image)
    out = converted["4-bit, vision too"]
    command = [
        sys.executable,
        "-m",
        "mlx_glm4v.cli",
        "generate",
        "--model",
        str(out),
        "--image",
        str(image),
        "--prompt",
        "hi",
        "--max-tokens",
        "3",
        "--json",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["generation_tokens"] == 3


# ---------------------------------------------------------------- mixture of experts (GLM-4.5V,
# GLM-4.6V)


@pytest.fixture(scope="module", params=["glm4v_moe", "glm46v"])
def moe_source(request):
    """(checkpoint path, image-prompt inputs): experts one by one (glm4v_moe) or fused (glm46v)."""
    path, _, processor = request.getfixturevalue(f"{request.param}_checkpoint")
    return path, prepare(
        processor, [user("image", "Describe this image.")], images=[picture(200, 300)]
    )


def router_dtypes(tensors: dict) -> set:
    routers = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")
    return {v.dtype for k, v in tensors.items() if k.endswith(routers)}


def test_moe_4bit_conversion_loads_and_generates(moe_source, tmp_path):
    """Experts quantized, routers kept in float32 whatever the dtype; exact to the same
    quantization in memory."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    from mlx_glm4v.generation.generate import generate

    src, inputs = moe_source
    options = dict(quantize=True, q_bits=4, q_group_size=32, dtype="bfloat16")
    out = conversion.convert(str(src), str(tmp_path / "q4"), **options)
    assert router_dtypes(all_tensors(out)) == {mx.float32}
    model, processor = load(str(out))
    moe = model.language_model.layers[1].mlp
    for proj in (moe.switch_mlp.gate_proj, moe.switch_mlp.up_proj, moe.switch_mlp.down_proj):
        assert isinstance(proj, QuantizedSwitchLinear) and proj.bits == 4
    reference = in_memory(src, options)
    # load_model's cast spares it
    assert reference.language_model.layers[1].mlp.gate.weight.dtype == mx.float32
    np.testing.assert_array_equal(run(model, inputs), run(reference, inputs))
    text = generate(
        model,
        processor,
        "Describe this image.",
        images=[picture(90, 120)],
        max_tokens=3,
        ignore_eos=True,
    )
    assert isinstance(text, str) and text


def test_moe_float32_conversion_is_exact(moe_source, tmp_path):
    src, inputs = moe_source
    out = conversion.convert(str(src), str(tmp_path / "f32"))
    np.testing.assert_array_equal(run(load_model(out), inputs), run(load_model(src), inputs))


def test_moe_stream_holds_at_most_one_layer(glm4v_moe_checkpoint, tmp_path, monkeypatch):
    """Experts cut across shards, as a big checkpoint's are: the converter carries at most part of
    one layer's experts from one shard to the next, and drops the multi-token-prediction layer."""
    src = glm4v_moe_checkpoint[0]
    tensors = all_tensors(src)
    layers = json.loads((src / "config.json").read_text())["text_config"]["num_hidden_layers"]
    mtp = {
        k.replace(f"layers.{layers - 1}.", f"layers.{layers}."): v
        for k, v in tensors.items()
        if f"layers.{layers - 1}." in k
    }
    tensors.update(mtp)
    tensors[f"model.language_model.layers.{layers}.eh_proj.weight"] = mx.zeros((4, 4))

    def layer_order(name):  # as checkpoints store them: layer by layer, expert by expert
        layer = re.search(r"layers\.(\d+)\.", name)
        return int(layer[1]) if layer else -1, [
            int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)
        ]

    cut = tmp_path / "cut"
    shutil.copytree(src, cut, ignore=shutil.ignore_patterns("*.safetensors*"))
    names = sorted(tensors, key=layer_order)
    shards = [names[i : i + 5] for i in range(0, len(names), 5)]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(cut / file), {k: tensors[k] for k in shard})
        weight_map.update(dict.fromkeys(shard, file))
    (cut / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    carried = []  # the expert tensors held back after each shard
    push = conversion.ExpertStream.push

    def watched(self, shard):
        yield from push(self, shard)
        carried.append([name for experts in self.held.values() for name in experts])

    monkeypatch.setattr(conversion.ExpertStream, "push", watched)
    out = conversion.convert(str(cut), str(tmp_path / "out"))
    assert len(carried) == len(shards) and any(carried)
    for held in carried:  # part of one layer's experts (3 projections x 8), never more
        assert len({layer_order(name)[0] for name in held}) <= 1 and len(held) < 3 * 8, held
    assert not any(f"layers.{layers}." in k for k in all_tensors(out))
    inputs = prepare(
        glm4v_moe_checkpoint[2], [user("image", "Describe this image.")], images=[picture(200, 300)]
    )
    np.testing.assert_array_equal(run(load_model(out), inputs), run(load_model(src), inputs))


# ---------------------------------------------------------------- GLM-OCR and its MTP layer


@pytest.fixture(scope="module")
def ocr_source(glm_ocr_checkpoint):
    """(hub-layout GLM-OCR checkpoint with its MTP layer, image-prompt inputs)."""
    path, _, processor = glm_ocr_checkpoint
    return path, prepare(processor, [user("image", "Text Recognition:")], images=[picture(120, 90)])


def run_with_mtp(model, inputs) -> tuple:
    """(logits, the MTP layer's logits over the prompt, the next tokens being the prompt's own
    shifted and the first greedy token)."""
    logits, hidden = model(**our_inputs(inputs), return_hidden=True)
    ids = inputs["input_ids"]
    following = np.concatenate([ids[:, 1:], np.array(logits[:, -1:].argmax(-1))], axis=1)
    drafts = model.mtp_forward(model.prepare(**our_inputs(inputs)), following, hidden)
    return np.array(logits.astype(mx.float32)), np.array(drafts.astype(mx.float32))


@pytest.mark.parametrize("case", ["float32", "4-bit"])
def test_ocr_conversion_keeps_the_mtp_layer(ocr_source, tmp_path, capsys, case):
    """convert keeps GLM-OCR's MTP layer (its copies of the embeddings and the head left out),
    quantized like the rest, says so, and the result loads back to the same numbers as the
    source treated alike in memory."""
    src, inputs = ocr_source
    options = {} if case == "float32" else dict(quantize=True, q_bits=4, q_group_size=32)
    out = conversion.convert(str(src), str(tmp_path / "out"), **options)
    assert "multi-token-prediction layer kept" in capsys.readouterr().out
    names = set(all_tensors(out))
    assert "mtp.eh_proj.weight" in names and "mtp.shared_head.norm.weight" in names
    assert not any(n.startswith("language_model.layers.2.") for n in names)
    assert not any("embed_tokens" in n or "shared_head.head" in n for n in names if "mtp" in n)
    model = load_model(out)
    if case == "4-bit":
        for path in ("mtp.eh_proj", "mtp.mtp_block.self_attn.q_proj", "lm_head"):
            assert bits_of(model, path) == 4, path
        reference = in_memory(src, {**options, "dtype": "float32"})
    else:
        reference = load_model(src)
    for ours, theirs in zip(run_with_mtp(model, inputs), run_with_mtp(reference, inputs)):
        np.testing.assert_array_equal(ours, theirs)


def test_ocr_mlx_vlm_layout_without_mtp_loads_exactly(ocr_source, tmp_path):
    """mlx-community's GLM-OCR conversions: mlx-vlm's names, the MTP layer deleted. The model
    loads without one and computes what the hub layout does."""
    src, inputs = ocr_source
    layers = json.loads((src / "config.json").read_text())["text_config"]["num_hidden_layers"]
    tensors = {}
    for key, value in all_tensors(src).items():
        if key.startswith(f"model.language_model.layers.{layers}."):
            continue
        key = key.replace("model.visual.", "vision_tower.").replace(
            "model.language_model.", "language_model.model."
        )
        key = "language_model.lm_head.weight" if key == "lm_head.weight" else key
        if key.endswith(("patch_embed.proj.weight", "downsample.weight")):
            value = value.transpose(0, *range(2, value.ndim), 1)
        tensors[key] = value
    as_mlx_vlm(src, tmp_path / "vlm", tensors)
    model = load_model(tmp_path / "vlm")
    assert "mtp" not in model
    np.testing.assert_array_equal(run(model, inputs), run(load_model(src), inputs))
