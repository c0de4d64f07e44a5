"""The trainer and `mlx-glm4v finetune` (issue #27): five SGD steps against transformers+peft from
the same adapter, accumulation and gradient checkpointing against one plain big batch, a real
command-line run that lowers the loss, checkpoints, resumes to the same numbers and fuses, QLoRA,
and bad data or oversized images refused in one sentence before training.
"""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from helpers import as_row, picture, write_parquet
from mlx.utils import tree_flatten
from peft import LoraConfig, get_peft_model

from mlx_glm4v.checkpoints.adapters import load_adapter
from mlx_glm4v.checkpoints.convert import convert
from mlx_glm4v.checkpoints.loader import load, load_model
from mlx_glm4v.errors import Glm4vError
from mlx_glm4v.inputs.processor import Processor
from mlx_glm4v.models.rope_index import token_types
from mlx_glm4v.tuning import finetune as finetune_module
from mlx_glm4v.tuning.adapters import LoraSettings, apply_lora
from mlx_glm4v.tuning.data import ConversationData, collate
from mlx_glm4v.tuning.trainer import (
    TrainingArgs,
    _loss,
    frozen_features,
    make_schedule,
    model_inputs,
    train,
)

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj", "qkv"]


def write_data(root, n=4):
    """`n` conversations about two images (train.jsonl) and two of them again (valid.jsonl)."""
    root.mkdir(parents=True, exist_ok=True)
    picture(56, 84, 1).save(root / "a.png")
    picture(84, 56, 2).save(root / "b.png")
    records = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "ab"[i % 2] + ".png"}},
                        {"type": "text", "text": f"What is in picture {i}?"},
                    ],
                },
                {"role": "assistant", "content": f"Picture {i} shows a cat" + " and a dog" * i},
            ]
        }
        for i in range(n)
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    return root


@pytest.fixture(scope="module")
def setup(glm4v_checkpoint, tmp_path_factory):
    path, ref, _ = glm4v_checkpoint
    data = write_data(tmp_path_factory.mktemp("data"))
    return path, ref, Processor.from_pretrained(path), data


def test_five_sgd_steps_match_transformers_peft(setup, tmp_path):
    """From the same peft adapter (random B), five SGD steps on a conversation with an image give
    transformers+peft's five losses."""
    path, ref, processor, data = setup
    torch.manual_seed(0)
    config = LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules=TARGETS)
    peft_model = get_peft_model(copy.deepcopy(ref), config)
    peft_model.save_pretrained(tmp_path / "init")
    train_set = ConversationData(data / "valid.jsonl", processor)
    batch = collate([train_set[0]], processor.tokenizer.pad_token_id)
    cfg = load_model(path).config
    types = token_types(
        batch["input_ids"], cfg.image_token_id, cfg.video_start_token_id, cfg.video_end_token_id
    )
    inputs = {k: torch.tensor(v) for k, v in {**batch, "mm_token_type_ids": types}.items()}
    lr = 0.05
    peft_model.train()
    sgd = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    want = []
    for _ in range(5):
        loss = peft_model(**inputs).loss
        want.append(loss.item())
        loss.backward()
        sgd.step()
        sgd.zero_grad()

    model = load_model(path)
    load_adapter(model, tmp_path / "init")
    model.freeze()
    model.unfreeze(keys=["lora_a", "lora_b"])
    one = ConversationData(data / "valid.jsonl", processor)
    one.conversations = one.conversations[:1]
    args = TrainingArgs(iters=5, batch_size=1, optimizer="sgd", learning_rate=lr, save_every=0)
    reports = train(model, one, args, LoraSettings(rank=4, alpha=8), tmp_path / "ours")
    got = [r.loss for r in reports]
    assert want[0] - want[-1] > 0.1  # the steps move the adapter
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def _one_step(path, processor, data, tmp_path, **kwargs):
    model = load_model(path)
    mx.random.seed(0)
    apply_lora(model, LoraSettings(rank=4, vision=True))
    args = TrainingArgs(iters=1, optimizer="sgd", learning_rate=0.1, save_every=0, **kwargs)
    [report] = train(
        model, ConversationData(data / "train.jsonl", processor), args, LoraSettings(), tmp_path
    )
    return report.loss, dict(tree_flatten(model.trainable_parameters()))


def test_accumulation_and_checkpointing_equal_the_big_batch(setup, tmp_path):
    """One step over four conversations: as one batch, as 2 x 2 and 4 x 1 accumulated, and with
    gradient checkpointing; the same loss and the same updated adapter."""
    path, _, processor, data = setup
    loss, params = _one_step(path, processor, data, tmp_path / "a", batch_size=4)
    for i, kwargs in enumerate(
        [
            dict(batch_size=2, grad_accumulation_steps=2),
            dict(batch_size=1, grad_accumulation_steps=4),
            dict(batch_size=4, grad_checkpoint=True),
        ]
    ):
        other, got = _one_step(path, processor, data, tmp_path / str(i), **kwargs)
        assert abs(other - loss) <= 1e-5 * loss, kwargs
        for name, value in params.items():
            scale = float(mx.abs(value).max())
            worst = float(mx.abs(got[name] - value).max())
            assert worst <= 1e-4 * scale, (kwargs, name, worst)


def test_a_frozen_tower_runs_before_the_differentiated_pass(setup):
    """Without --train-vision the features are computed outside value_and_grad (whose traced
    graph would keep the tower's activations): the same loss and gradients as through it."""
    path, _, processor, data = setup
    model = load_model(path)
    apply_lora(model, LoraSettings(rank=4))
    batch = collate(
        [ConversationData(data / "train.jsonl", processor)[i] for i in (0, 1)],
        processor.tokenizer.pad_token_id,
    )
    inputs = model_inputs(batch)
    memo = frozen_features(model, inputs)
    assert memo is not None and len(memo) == 2
    loss_and_grad = nn.value_and_grad(model, _loss)
    loss, grads = loss_and_grad(model, inputs, 10, memo)
    want, want_grads = loss_and_grad(model, inputs, 10, None)
    assert float(loss) == float(want)
    for (name, g), (_, w) in zip(tree_flatten(grads), tree_flatten(want_grads)):
        np.testing.assert_array_equal(np.array(g), np.array(w), err_msg=name)
    apply_lora(model, LoraSettings(rank=4, vision=True))
    assert frozen_features(model, inputs) is None  # a tower that trains runs inside


def cli(*args, check=True):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-m", "mlx_glm4v", *args], capture_output=True, text=True, env=env
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def losses(adapter_path) -> dict:
    lines = (adapter_path / "train_log.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_cli_run_lowers_the_loss_resumes_and_fuses(setup, tmp_path):
    path, _, _, data = setup
    common = [
        "finetune", "--model", str(path), "--data", str(data), "--batch-size", "2",
        "--learning-rate", "0.01", "--steps-per-report", "2", "--steps-per-eval", "3",
        "--save-every", "3", "--train-vision", "--lora-rank", "4", "--seed", "7",
        "--lr-schedule", "cosine", "--warmup", "1",
    ]  # fmt: skip
    whole = cli(*common, "--iters", "6", "--adapter-path", str(tmp_path / "whole"))
    assert "validation loss" in whole.stdout and "tokens/s" in whole.stdout
    full = losses(tmp_path / "whole")
    assert full[6] < 0.8 * full[1]
    # resumed from step 3's checkpoint (adapters, optimizer state, step): the same steps 4-6
    assert (tmp_path / "whole" / "0000003_optimizer.safetensors").is_file()
    part = tmp_path / "part"
    cli(*common, "--iters", "6", "--adapter-path", str(part), "--resume-adapter-file",
        str(tmp_path / "whole" / "0000003_adapters.safetensors"))  # fmt: skip
    assert losses(part) == {k: v for k, v in full.items() if k > 3}
    # fused: the checkpoint answers as the model with the adapter
    fused = tmp_path / "fused"
    cli("convert", "--hf-path", str(path), "--mlx-path", str(fused), "--adapter",
        str(tmp_path / "whole"))  # fmt: skip
    ask = ["--image", str(data / "a.png"), "--prompt", "What is in picture 1?", "--temp", "0",
           "--max-tokens", "8"]  # fmt: skip
    adapted = cli("generate", "--model", str(path), "--adapter", str(tmp_path / "whole"), *ask)
    base = cli("generate", "--model", str(path), *ask)
    assert (
        cli("generate", "--model", str(fused), *ask).stdout.split("\n")[0]
        == (adapted.stdout.split("\n")[0])
    )
    assert adapted.stdout.split("\n")[0] != base.stdout.split("\n")[0]


def test_cli_trains_on_a_dataset_directory(setup, tmp_path):
    """`--data` a hub-style parquet directory in mlx-vlm's form (the same conversations, images
    as bytes in the images column): a train and a validation split, two steps."""
    path, _, _, data = setup
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    rows = [as_row(r, data, own_path=None) for r in records]
    hub = tmp_path / "hub"
    write_parquet(hub / "data" / "train-00000-of-00001.parquet", rows)
    write_parquet(hub / "data" / "validation-00000-of-00001.parquet", rows[:2])
    out = tmp_path / "adapter"
    run = cli("finetune", "--model", str(path), "--data", str(hub), "--iters", "2",
              "--batch-size", "2", "--steps-per-eval", "2", "--learning-rate", "0.01",
              "--adapter-path", str(out))  # fmt: skip
    assert "validation loss" in run.stdout
    assert sorted(losses(out)) == [1, 2] and (out / "adapters.safetensors").is_file()


def test_ctrl_c_keeps_the_last_checkpoint(setup, tmp_path):
    path, _, _, data = setup
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.Popen(
        [sys.executable, "-m", "mlx_glm4v", "finetune", "--model", str(path), "--data", str(data),
         "--batch-size", "2", "--iters", "100000", "--save-every", "1", "--adapter-path", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # Ctrl-C as a terminal sends it: a runner started in the background passes SIGINT on
        # ignored, and then only a signal that landed inside a checkpoint's save stopped the run
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (out / "0000003_adapters.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert err.strip().startswith("stopped after step") and "Traceback" not in err
    step = int(err.split("; step ")[1].split("'s checkpoint")[0])
    # the latest checkpoint is whole and is the last step's
    saved = mx.load(str(out / "adapters.safetensors"))
    numbered = mx.load(str(out / f"{step:07d}_adapters.safetensors"))
    assert saved.keys() == numbered.keys()
    assert all(mx.array_equal(saved[k], numbered[k]) for k in saved)
    assert not list(out.glob(".saving-*"))


def test_qlora_trains_a_quantized_checkpoint(setup, tmp_path):
    path, _, _, data = setup
    quantized = convert(str(path), str(tmp_path / "q4"), quantize=True, q_group_size=32)
    args = TrainingArgs(iters=4, batch_size=2, learning_rate=0.02, save_every=0)
    reports = finetune_module.finetune(
        str(quantized), data, tmp_path / "adapter", LoraSettings(rank=4), args
    )
    assert reports[-1].loss < reports[0].loss
    model, _ = load(str(quantized), adapter_path=str(tmp_path / "adapter"))
    layer = model.language_model.layers[0].self_attn.q_proj
    assert type(layer.linear).__name__ == "QuantizedLinear"


def test_bad_data_and_oversized_images_are_refused_in_one_sentence(setup, tmp_path):
    path, _, _, data = setup
    bad = tmp_path / "bad.jsonl"
    for image in ("a.png", "b.png"):
        (tmp_path / image).write_bytes((data / image).read_bytes())
    bad.write_text((data / "train.jsonl").read_text() + '{"messages": [{"role": "user"}]}\n')
    for args, message in [
        (["--data", str(bad)], "bad.jsonl line 5: messages[0].content"),
        (["--data", str(tmp_path / "none")], "is neither a JSONL file nor a directory"),
        (
            ["--data", str(data), "--max-memory", "0.001"],
            "line 1: its image messages[0].content[0]",
        ),
        (["--data", str(data), "--optimizer", "lion"], "optimizer 'lion' is not one of"),
        (["--data", str(data), "--batch-size", "9"], "has 4 conversations, fewer than"),
    ]:
        result = cli("finetune", "--model", str(path), "--iters", "1", *args,
                     "--adapter-path", str(tmp_path / "out"), check=False)  # fmt: skip
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
        assert "Traceback" not in result.stderr


def test_warm_up_then_decay():
    """A linear warm-up from 0 reaches the learning rate at step `warmup`, then cosine or linear
    decay reaches 0 at `iters` (mlx-lm's `build_schedule` with `warmup`)."""
    for kind, middle in (("cosine", 0.5), ("linear", 0.5), ("constant", 1.0)):
        schedule = make_schedule(
            TrainingArgs(iters=10, warmup=2, lr_schedule=kind, learning_rate=1.0)
        )
        got = [float(schedule(mx.array(s))) for s in (0, 1, 2, 6, 10)]
        end = 1.0 if kind == "constant" else 0.0
        np.testing.assert_allclose(got, [0.0, 0.5, 1.0, middle, end], atol=1e-6, err_msg=kind)
    with pytest.raises(Glm4vError, match="--warmup 10 must be below --iters 10"):
        TrainingArgs(iters=10, warmup=10)
