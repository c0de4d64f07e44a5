"""Adapters (issue #27): PEFT's files read against transformers+peft, ours exported and read by
peft, QLoRA, fusing (in memory and by `convert --adapter`), `--adapter` on the commands, and bad
adapter directories refused in one sentence.

transformers+peft is the reference: a tiny GLM-4.1V checkpoint gets a peft-made adapter whose B
factors are random (peft's `init_lora_weights=False`), so an adapter left out or misread moves
the logits far beyond the 1e-4 they must stay within.
"""

import copy
import json
import re
import shutil

import httpx
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from helpers import picture
from peft import LoraConfig, PeftModel, get_peft_model
from reference import our_inputs, prepare, user
from safetensors.torch import save_file
from typer.testing import CliRunner

import mlx_glm4v
from mlx_glm4v.checkpoints.adapters import fuse, load_adapter, read_adapter
from mlx_glm4v.checkpoints.convert import convert
from mlx_glm4v.checkpoints.loader import load_model
from mlx_glm4v.cli import app
from mlx_glm4v.errors import Glm4vError
from mlx_glm4v.models.mlxlm import LoRASwitchLinear, QuantizedSwitchLinear, SwitchLinear
from mlx_glm4v.serving.prefix import PrefixCache
from mlx_glm4v.tuning.adapters import LoraSettings, apply_lora, export_peft, save_adapters

TOL = 1e-4

# name -> peft LoraConfig arguments; every one adapts some of the vision tower too
PEFT_CASES = {
    "lora": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj", "qkv"],
        modules_to_save=["lm_head"],
        lora_dropout=0.5,  # off when generating
    ),
    "dora, rslora, regex targets, alpha pattern": dict(
        r=8,
        lora_alpha=16,
        use_dora=True,
        use_rslora=True,
        target_modules=r".*\.(k_proj|gate_up_proj|merger\.proj)",
        alpha_pattern={"k_proj": 4},
    ),
}


@pytest.fixture(scope="module")
def base(glm4v_checkpoint):
    path, ref, processor = glm4v_checkpoint
    inputs = prepare(processor, [user("image", "What is this?")], images=[picture(56, 84)])
    return path, ref, processor, inputs


def torch_logits(model, inputs):
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()


def our_logits(model, inputs):
    return np.array(model(**our_inputs(inputs)))


def peft_adapter(ref, out, seed=0, **config):
    """A peft adapter over a copy of `ref` with random B factors (and a perturbed
    modules_to_save copy), saved to `out`; returns the peft model."""
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(ref), LoraConfig(init_lora_weights=False, **config))
    for module in model.modules():
        saved = getattr(module, "modules_to_save", None)
        if saved is not None and "default" in saved:
            with torch.no_grad():
                saved["default"].weight.add_(0.05 * torch.randn_like(saved["default"].weight))
    model.eval().save_pretrained(out)
    return model


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_matches_transformers_peft(base, tmp_path, case):
    path, ref, _, inputs = base
    reference = peft_adapter(ref, tmp_path, **PEFT_CASES[case])
    want = torch_logits(reference, inputs)
    assert np.abs(want - torch_logits(ref, inputs)).max() > 100 * TOL  # the adapter matters
    model = load_model(path)
    adapter = load_adapter(model, tmp_path)
    assert adapter.layers and any(n.startswith("visual.") for n in adapter.layers)
    worst = float(np.abs(our_logits(model, inputs) - want).max())
    assert worst <= TOL, f"{case}: max |logit difference| {worst:.2e}"


@pytest.fixture(scope="module")
def moe(glm4v_moe_checkpoint):
    path, ref, processor = glm4v_moe_checkpoint
    inputs = prepare(processor, [user("image", "What is this?")], images=[picture(56, 84)])
    return path, ref, processor, inputs


def per_expert_adapter(ref, out, seed=0, r=4, alpha=8):
    """An adapter as peft wrote them on transformers 4, where every expert was a linear layer
    (`experts.N.gate_proj.lora_A.weight`, ...), random, written by hand (transformers 5 has no
    such layers to make it from); returns it as transformers+peft reads it today."""
    torch.manual_seed(seed)
    text = ref.config.text_config
    hidden, width = text.hidden_size, text.moe_intermediate_size
    shapes = {
        "gate_proj": (hidden, width),
        "up_proj": (hidden, width),
        "down_proj": (width, hidden),
    }
    tensors = {}
    for layer in range(text.first_k_dense_replace, text.num_hidden_layers):
        for expert in range(text.n_routed_experts):
            for proj, (n_in, n_out) in shapes.items():
                key = f"base_model.model.model.language_model.layers.{layer}.mlp.experts.{expert}"
                tensors[f"{key}.{proj}.lora_A.weight"] = torch.randn(r, n_in) / n_in**0.5
                tensors[f"{key}.{proj}.lora_B.weight"] = 0.1 * torch.randn(n_out, r)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(shapes)).to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    (out / "adapter_config.json").write_text(json.dumps(config))
    return PeftModel.from_pretrained(copy.deepcopy(ref), out).eval()


# GLM-4.5V's routed experts are fused parameters in transformers 5; peft adapts them through
# `target_parameters`, and turns MLP names into those (gate_up at twice the rank)
EXPERT_CASES = {
    "mlp names": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]
    ),
    "target_parameters, rslora": dict(
        r=2,
        lora_alpha=6,
        use_rslora=True,
        target_modules=["k_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    ),
    "down_proj alone": dict(r=4, lora_alpha=4, target_modules=[], target_parameters=["down_proj"]),
    "transformers 4's per-expert layers": None,
}


@pytest.mark.parametrize("case", list(EXPERT_CASES))
def test_peft_adapter_on_the_experts(moe, tmp_path, case):
    path, ref, _, inputs = moe
    if EXPERT_CASES[case] is None:
        reference = per_expert_adapter(ref, tmp_path)
    else:
        reference = peft_adapter(ref, tmp_path, **EXPERT_CASES[case])
    want = torch_logits(reference, inputs)
    assert np.abs(want - torch_logits(ref, inputs)).max() > 100 * TOL  # the adapter matters
    model = load_model(path)
    adapter = load_adapter(model, tmp_path)
    assert any(".switch_mlp." in n for n in adapter.layers)
    worst = float(np.abs(our_logits(model, inputs) - want).max())
    assert worst <= TOL, f"{case}: max |logit difference| {worst:.2e}"


def test_peft_adapter_on_the_shared_experts(moe, tmp_path, monkeypatch):
    """The shared experts' and the dense layer's projections, as peft adapted them on
    transformers 4. peft on transformers 5 turns every gate_proj/up_proj/down_proj name into the
    routed experts' parameters; with that mapping off it adapts these linear layers again."""
    import peft.utils.transformers_weight_conversion as conversion

    path, ref, _, inputs = moe
    monkeypatch.setattr(conversion, "_MOE_TARGET_MODULE_MAPPING", {})
    targets = ["q_proj", "mlp.gate_proj", "up_proj", "shared_experts.down_proj"]
    reference = peft_adapter(ref, tmp_path, r=4, lora_alpha=8, target_modules=targets)
    want = torch_logits(reference, inputs)
    assert np.abs(want - torch_logits(ref, inputs)).max() > 100 * TOL
    model = load_model(path)
    adapter = load_adapter(model, tmp_path)
    assert {
        n.rpartition(".")[0] for n in adapter.layers if "language_model.layers" in n and ".mlp" in n
    } == {
        "language_model.layers.0.mlp",
        "language_model.layers.1.mlp.shared_experts",
        "language_model.layers.2.mlp.shared_experts",
    }
    worst = float(np.abs(our_logits(model, inputs) - want).max())
    assert worst <= TOL, f"max |logit difference| {worst:.2e}"


def trained(path, settings, seed=1):
    """Our model with fresh adapter layers whose factors (and DoRA magnitudes) are random, as if
    trained."""
    model = load_model(path)
    apply_lora(model, settings)
    mx.random.seed(seed)
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape)
            if hasattr(module, "m"):
                module.m = module.m * (1 + 0.1 * mx.random.normal(module.m.shape))
    return model


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_export_round_trip_through_peft(base, tmp_path, kind):
    path, ref, _, inputs = base
    settings = LoraSettings(rank=4, alpha=12, vision=True, fine_tune_type=kind)
    model = trained(path, settings)
    ours = our_logits(model, inputs)
    save_adapters(model, tmp_path / "ours", settings)
    export_peft(tmp_path / "ours", tmp_path / "peft")
    reference = PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path / "peft").eval()
    worst = float(np.abs(torch_logits(reference, inputs) - ours).max())
    assert worst <= TOL, f"{kind}: max |logit difference| {worst:.2e}"
    # and our own file reads back to the same model
    again = load_model(path)
    load_adapter(again, tmp_path / "ours")
    np.testing.assert_array_equal(our_logits(again, inputs), ours)


def test_apply_lora_trains_only_the_adapter(base):
    path = base[0]
    model = load_model(path)
    paths = apply_lora(model, LoraSettings(targets=("q_proj", "v_proj")))
    assert paths and all(p.endswith(("q_proj", "v_proj")) for p in paths)
    assert not any(p.startswith("visual.") for p in paths)
    leaves = {k.rpartition(".")[2] for k, _ in nn.utils.tree_flatten(model.trainable_parameters())}
    assert leaves == {"lora_a", "lora_b"}
    with pytest.raises(Glm4vError, match="'qkv_proj' names no linear layer"):
        apply_lora(load_model(path), LoraSettings(targets=("qkv_proj",)))
    full = load_model(path)
    assert apply_lora(full, LoraSettings(fine_tune_type="full")) == []
    assert len(nn.utils.tree_flatten(full.trainable_parameters())) == len(
        nn.utils.tree_flatten(full.parameters())
    )


def test_qlora_on_a_quantized_checkpoint_and_its_fuse(base, tmp_path):
    path, _, _, inputs = base
    quantized = convert(str(path), str(tmp_path / "q4"), quantize=True, q_group_size=32)
    settings = LoraSettings(rank=4, alpha=8)
    model = trained(quantized, settings)
    layer = model.language_model.layers[0].self_attn.q_proj
    assert isinstance(layer.linear, nn.QuantizedLinear)  # QLoRA: the base stays quantized
    adapted = our_logits(model, inputs)
    save_adapters(model, tmp_path / "adapter", settings)
    # the adapter's layers equal their dequantized, fused weights
    exact = load_model(quantized)
    load_adapter(exact, tmp_path / "adapter")
    fuse(exact, dequantize=True)
    assert isinstance(exact.language_model.layers[0].self_attn.q_proj, nn.Linear)
    np.testing.assert_allclose(our_logits(exact, inputs), adapted, atol=TOL, rtol=0)
    # fused and quantized again: the layer is quantized with its old settings
    requantized = fuse(model)
    layer = requantized.language_model.layers[0].self_attn.q_proj
    assert isinstance(layer, nn.QuantizedLinear) and (layer.bits, layer.group_size) == (4, 32)


def greedy_cli(*args):
    result = CliRunner().invoke(
        app, ["generate", *args, "--prompt", "Describe it.", "--max-tokens", "8", "--temp", "0"]
    )
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def our_adapter(base, tmp_path_factory):
    path = base[0]
    settings = LoraSettings(rank=4, alpha=32, vision=True, fine_tune_type="dora")
    model = trained(path, settings, seed=3)
    return save_adapters(model, tmp_path_factory.mktemp("adapter"), settings)


def test_convert_fuses_the_adapter(base, our_adapter, tmp_path):
    """`convert --adapter` writes a checkpoint whose greedy reply is the adapter's; the base
    model's differs, so the adapter is seen."""
    path, _, _, inputs = base
    out = tmp_path / "fused"
    result = CliRunner().invoke(
        app,
        ["convert", "--hf-path", str(path), "--mlx-path", str(out), "--adapter", str(our_adapter)],
    )
    assert result.exit_code == 0, result.output
    adapted, _ = mlx_glm4v.load(str(path), adapter_path=str(our_adapter))  # the Python API
    np.testing.assert_allclose(
        our_logits(load_model(out), inputs), our_logits(adapted, inputs), atol=TOL, rtol=0
    )
    image = tmp_path / "x.png"
    picture(56, 84).save(image)
    with_adapter = greedy_cli(
        "--model", str(path), "--adapter", str(our_adapter), "--image", str(image)
    )
    assert with_adapter == greedy_cli("--model", str(out), "--image", str(image))
    assert with_adapter != greedy_cli("--model", str(path), "--image", str(image))


def bad_adapters(source, root):
    """name -> (adapter directory, what the one-line error must say)."""
    cases = {"missing": (root / "nowhere", "does not exist")}
    no_config = root / "no-config"
    shutil.copytree(source, no_config)
    (no_config / "adapter_config.json").unlink()
    cases["no config"] = (no_config, "has no adapter_config.json")
    no_weights = root / "no-weights"
    shutil.copytree(source, no_weights)
    (no_weights / "adapters.safetensors").unlink()
    cases["no weights"] = (no_weights, "has neither adapters.safetensors nor")
    shape = root / "shape"
    shutil.copytree(source, shape)
    tensors = mx.load(str(shape / "adapters.safetensors"))
    name = next(k for k in tensors if k.endswith("q_proj.lora_a"))
    tensors[name] = tensors[name][:-1]
    mx.save_safetensors(str(shape / "adapters.safetensors"), tensors)
    cases["shape"] = (shape, "has low-rank factors")
    target = root / "target"
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    config["lora_parameters"]["keys"].append("attention.wqkv")
    (target / "adapter_config.json").write_text(json.dumps(config))
    cases["unknown target"] = (target, "target module 'attention.wqkv' names no linear layer")
    return cases


def test_bad_adapter_directories_get_one_sentence(base, our_adapter, tmp_path):
    path = base[0]
    for name, (directory, problem) in bad_adapters(our_adapter, tmp_path).items():
        for command in (
            ["generate", "--model", str(path), "--prompt", "hi", "--adapter", str(directory)],
            [
                "convert",
                "--hf-path",
                str(path),
                "--mlx-path",
                str(tmp_path / f"out-{name}"),
                "--adapter",
                str(directory),
            ],
        ):
            result = CliRunner().invoke(app, command)
            assert result.exit_code != 0, f"{name}: {command[0]} accepted it"
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and problem in lines[0], f"{name}: {result.output}"
            assert "Traceback" not in result.output
        with pytest.raises(Glm4vError, match=problem):
            load_adapter(load_model(path), directory)


def test_prefix_entries_belong_to_their_model():
    """The prefix cache's key includes the model's identity (checkpoint and adapter)."""
    from mlx_glm4v.models.mlxlm import KVCache

    cache = [KVCache()]
    cache[0].update_and_fetch(mx.zeros((1, 1, 4, 2)), mx.zeros((1, 1, 4, 2)))
    ids = np.arange(4)
    base = PrefixCache(1 << 20, identity="model")
    base.store(ids, None, cache)
    assert base.lookup(ids, None)[1] == 4
    base.identity = "model+adapter"
    assert base.lookup(ids, None) == (None, 0)


def test_adapter_digest_tells_adapters_apart(our_adapter, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(our_adapter, other)
    assert read_adapter(other).digest == read_adapter(our_adapter).digest
    config = json.loads((other / "adapter_config.json").read_text())
    config["lora_parameters"]["scale"] *= 2
    (other / "adapter_config.json").write_text(json.dumps(config))
    assert read_adapter(other).digest != read_adapter(our_adapter).digest


def test_convert_fuses_then_quantizes(base, our_adapter, tmp_path):
    """`convert --adapter -q` quantizes the fused weights: the same bits as quantizing the fused
    float checkpoint."""
    path = base[0]
    fused = convert(str(path), str(tmp_path / "fused"), adapter=str(our_adapter))
    options = dict(quantize=True, q_group_size=32)
    one = convert(str(path), str(tmp_path / "one"), adapter=str(our_adapter), **options)
    two = convert(str(fused), str(tmp_path / "two"), **options)
    a, b = mx.load(str(one / "model.safetensors")), mx.load(str(two / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.endswith(".scales") for k in a)
    for key in a:
        assert mx.array_equal(a[key], b[key]), key


def test_serve_with_an_adapter(base, our_adapter, tmp_path):
    """`serve --adapter` names the model with its adapter and replies as the fused checkpoint
    does; a missing adapter directory ends `serve` before it listens."""
    from servers import Server

    path = base[0]
    fused = convert(str(path), str(tmp_path / "fused"), adapter=str(our_adapter))
    body = {
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 8,
        "temperature": 0,
    }
    replies = {}
    for name, checkpoint, args in [
        ("adapter", path, ["--adapter", str(our_adapter)]),
        ("fused", fused, []),
    ]:
        server = Server(checkpoint, args, tmp_path / f"{name}.log")
        try:
            models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
            served = models[0]["id"]
            body["model"] = served
            response = server.post(body)
            assert response.status_code == 200, response.text
            replies[name] = response.json()["choices"][0]["message"]["content"]
        finally:
            server.close()
        if name == "adapter":
            assert served == f"{path.name}+{our_adapter.name}"
    assert replies["adapter"] == replies["fused"]
    result = CliRunner().invoke(
        app, ["serve", "--model", str(path), "--adapter", str(tmp_path / "nowhere")]
    )
    assert result.exit_code != 0 and "does not exist" in result.output
    assert len(result.output.strip().splitlines()) == 1


def expert_layers(model):
    return [m for _, m in model.named_modules() if isinstance(m, LoRASwitchLinear)]


def test_moe_lora_export_round_trip_and_fuse(moe, tmp_path, monkeypatch):
    """LoRA on the routed experts (and everything else) trained here, exported in PEFT's form:
    peft reads it to the same logits; fusing it, in memory and by `convert --adapter`, too."""
    import peft.utils.transformers_weight_conversion as conversion

    path, ref, _, inputs = moe
    settings = LoraSettings(rank=4, alpha=12)
    model = trained(path, settings)
    assert len(expert_layers(model)) == 3 * 2  # gate, up, down of both MoE layers
    ours = our_logits(model, inputs)
    assert np.abs(ours - our_logits(load_model(path), inputs)).max() > 100 * TOL
    save_adapters(model, tmp_path / "ours", settings)
    export_peft(tmp_path / "ours", tmp_path / "peft")
    # the shared experts' names would be read as the routed experts' (see export_peft)
    monkeypatch.setattr(conversion, "_MOE_TARGET_MODULE_MAPPING", {})
    reference = PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path / "peft").eval()
    worst = float(np.abs(torch_logits(reference, inputs) - ours).max())
    assert worst <= TOL, f"peft: max |logit difference| {worst:.2e}"
    again = load_model(path)
    load_adapter(again, tmp_path / "ours")
    np.testing.assert_array_equal(our_logits(again, inputs), ours)
    fused = fuse(again)
    assert not expert_layers(fused)
    np.testing.assert_allclose(our_logits(fused, inputs), ours, atol=TOL, rtol=0)
    out = convert(str(path), str(tmp_path / "fused"), adapter=str(tmp_path / "ours"))
    np.testing.assert_allclose(our_logits(load_model(out), inputs), ours, atol=TOL, rtol=0)


def test_peft_experts_export_reads_back(moe, tmp_path):
    """An adapter of the routed experts alone (from peft's files) exported again: peft on
    transformers 5 reads it as it is, with no help."""
    path, ref, _, inputs = moe
    peft_adapter(
        ref, tmp_path / "in", r=2, lora_alpha=4, target_modules=["v_proj", "up_proj", "gate_proj"]
    )
    model = load_model(path)
    load_adapter(model, tmp_path / "in")
    ours = our_logits(model, inputs)
    # ours, as save_adapters writes it from the loaded layers, the rest frozen as in training
    model.freeze()
    model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    save_adapters(model, tmp_path / "ours", LoraSettings(rank=2, alpha=4))
    export_peft(tmp_path / "ours", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_parameters"] and all(
        "gate_up_proj" in t for t in config["target_parameters"]
    )
    reference = PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path / "out").eval()
    worst = float(np.abs(torch_logits(reference, inputs) - ours).max())
    assert worst <= TOL, f"max |logit difference| {worst:.2e}"


def test_qlora_on_the_quantized_experts(moe, tmp_path):
    path, _, _, inputs = moe
    quantized = convert(str(path), str(tmp_path / "q4"), quantize=True, q_group_size=32)
    settings = LoraSettings(rank=4, alpha=8, targets=("down_proj", "up_proj"))
    model = trained(quantized, settings)
    layer = model.language_model.layers[1].mlp.switch_mlp.down_proj
    assert isinstance(layer, LoRASwitchLinear) and isinstance(layer.linear, QuantizedSwitchLinear)
    adapted = our_logits(model, inputs)
    save_adapters(model, tmp_path / "adapter", settings)
    exact = load_model(quantized)
    load_adapter(exact, tmp_path / "adapter")
    fuse(exact, dequantize=True)
    assert isinstance(exact.language_model.layers[1].mlp.switch_mlp.down_proj, SwitchLinear)
    np.testing.assert_allclose(our_logits(exact, inputs), adapted, atol=TOL, rtol=0)
    layer = fuse(model).language_model.layers[1].mlp.switch_mlp.up_proj
    assert isinstance(layer, QuantizedSwitchLinear) and (layer.bits, layer.group_size) == (4, 32)


def test_bad_expert_adapters_get_one_sentence(moe, base, tmp_path):
    path, ref, _, _ = moe
    peft_adapter(ref, tmp_path / "good", r=2, target_modules=["gate_proj", "up_proj", "down_proj"])
    tensors = mx.load(str(tmp_path / "good" / "adapter_model.safetensors"))
    config = (tmp_path / "good" / "adapter_config.json").read_text()
    key = "base_model.model.model.language_model.layers.2.mlp.experts.lora_A.weight"

    def variant(name, change):
        out = tmp_path / name
        out.mkdir()
        changed = dict(tensors)
        change(changed)
        mx.save_safetensors(str(out / "adapter_model.safetensors"), changed)
        (out / "adapter_config.json").write_text(config)
        return out

    def drop_row(t):
        t[key] = t[key][:-1]

    cases = {
        "rank": (
            variant("rank", drop_row),
            "'model.language_model.layers.2.mlp.experts.down_proj' has LoRA factors",
        ),
    }
    per_expert = tmp_path / "per-expert"
    per_expert_adapter(ref, per_expert)
    t = mx.load(str(per_expert / "adapter_model.safetensors"))
    gone = "base_model.model.model.language_model.layers.1.mlp.experts.3.up_proj"
    t = {k: v for k, v in t.items() if not k.startswith(gone)}
    mx.save_safetensors(str(per_expert / "adapter_model.safetensors"), t)
    cases["missing expert"] = (
        per_expert,
        "expert 3 of 'language_model.layers.1.mlp.switch_mlp.up_proj' has no LoRA tensors",
    )
    settings = LoraSettings(rank=2, targets=("down_proj",))
    dora = save_adapters(trained(path, settings), tmp_path / "dora", settings)
    t = mx.load(str(dora / "adapters.safetensors"))
    t["language_model.layers.1.mlp.switch_mlp.down_proj.m"] = mx.ones((128,))
    mx.save_safetensors(str(dora / "adapters.safetensors"), t)
    cases["dora"] = (dora, "switch_mlp.down_proj' has a DoRA magnitude; DoRA does not reach")
    for directory, problem in cases.values():
        with pytest.raises(Glm4vError, match=re.escape(problem)) as e:
            load_adapter(load_model(path), directory)
        assert str(directory) in str(e.value) and len(str(e.value).splitlines()) == 1
    # the experts' adapter on GLM-4.1V, which has none
    with pytest.raises(Glm4vError, match=r"switch_mlp\.down_proj' is not a layer of this model"):
        load_adapter(load_model(base[0]), tmp_path / "good")
