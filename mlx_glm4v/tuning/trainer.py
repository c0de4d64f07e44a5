"""The training loop: value_and_grad through the model's own loss, an `mlx.optimizers` optimizer
with a warm-up and decay schedule, accumulation, gradient checkpointing, validation, checkpoints
and resuming. Nothing clever: one step is `accumulation` micro-batches and one update.

Accumulation follows transformers' `num_items_in_batch`: each micro-batch's loss is its summed
cross-entropy over the number of labelled tokens in the whole step, and the gradients add up, so
a step's loss and gradients are those of one batch of all its conversations.

Which conversations a micro-batch holds follows from the seed and the micro-batch's index alone
(a permutation per epoch), and dropout is seeded per step, so a run resumed from a checkpoint
(adapters, optimizer state and step) gives the numbers of the run never stopped.
"""

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..checkpoints.adapters import OURS
from ..errors import Glm4vError
from ..models.loss import IGNORE_INDEX
from ..models.media import FeatureMemo
from ..models.model import Model
from .adapters import LoraSettings, save_adapters
from .checkpointing import grad_checkpointing
from .data import MEDIA_KEYS, collate

OPTIMIZERS = {"adamw": optim.AdamW, "sgd": optim.SGD, "adam": optim.Adam}
SCHEDULES = ("constant", "cosine", "linear")
STATE = "optimizer.safetensors"  # beside adapters.safetensors: the optimizer's state and step
LOG = "train_log.jsonl"


@dataclass
class TrainingArgs:
    """A run's settings, named as mlx-lm's `lora` names them."""

    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    optimizer: str = "adamw"
    lr_schedule: str = "constant"  # or cosine / linear decay to 0 over the iters after warm-up
    warmup: int = 0
    grad_accumulation_steps: int = 1
    grad_checkpoint: bool = False
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    save_every: int = 100
    seed: int = 0
    max_memory: Optional[int] = None  # bytes a step may take; default: the device's memory

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise Glm4vError(f"optimizer {self.optimizer!r} is not one of adamw, adam, sgd.")
        if self.lr_schedule not in SCHEDULES:
            raise Glm4vError(
                f"learning-rate schedule {self.lr_schedule!r} is not one of {', '.join(SCHEDULES)}."
            )
        for name in ("iters", "batch_size", "grad_accumulation_steps", "steps_per_report"):
            if getattr(self, name) < 1:
                raise Glm4vError(f"--{name.replace('_', '-')} must be at least 1.")
        if self.warmup < 0 or (self.warmup and self.warmup >= self.iters):
            raise Glm4vError(f"--warmup {self.warmup} must be below --iters {self.iters}.")


@dataclass
class Report:
    """What a step reports: its loss, validation loss when one was taken, throughput, memory."""

    step: int
    loss: float
    learning_rate: float
    tokens: int  # tokens trained on this step (padding left out)
    tokens_per_second: float
    peak_memory_gb: float
    val_loss: Optional[float] = None
    seconds: float = 0.0  # the whole step
    data_seconds: float = 0.0  # of which reading and encoding its conversations


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, after the last complete checkpoint was left in place."""

    def __init__(self, step: int, saved: int):
        super().__init__(step, saved)
        self.step, self.saved = step, saved  # the last step done; the last one checkpointed


# ---- optimizer and schedule ---------------------------------------------------------------------


def make_schedule(args: TrainingArgs):
    """The learning rate by step: a linear warm-up from 0 and then constant, cosine or linear
    decay to 0 at `iters` (mlx-lm's `build_schedule` with `warmup`, from mlx.optimizers)."""
    lr, rest = args.learning_rate, max(args.iters - args.warmup, 1)
    if args.lr_schedule == "cosine":
        main = optim.cosine_decay(lr, rest)
    elif args.lr_schedule == "linear":
        main = optim.linear_schedule(lr, 0.0, rest)
    else:
        main = lr if not args.warmup else (lambda _: mx.array(lr))
    if not args.warmup:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, lr, args.warmup), main], [args.warmup])


def make_optimizer(args: TrainingArgs) -> optim.Optimizer:
    return OPTIMIZERS[args.optimizer](learning_rate=make_schedule(args))


# ---- batches ------------------------------------------------------------------------------------


def batch_indices(n: int, batch_size: int, seed: int, index: int) -> list:
    """The conversations of micro-batch `index`: epoch after epoch, each a fresh permutation of
    the data (seeded by the seed and the epoch), cut into whole batches."""
    per_epoch = n // batch_size
    epoch, at = divmod(index, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[at * batch_size : (at + 1) * batch_size].tolist()


def model_inputs(batch: dict) -> dict:
    """A collated batch as the model's keyword arguments (labels included)."""
    return {k: mx.array(v) for k, v in batch.items()}


def counted(labels) -> int:
    """Labelled targets of a batch: the tokens its loss averages over (after the shift)."""
    return int((np.asarray(labels)[:, 1:] != IGNORE_INDEX).sum())


def _loss(model: Model, inputs: dict, num_items: int, memo: Optional[FeatureMemo]) -> mx.array:
    return model(**inputs, num_items=num_items, vision_memo=memo).loss


def frozen_features(model: Model, inputs: dict) -> Optional[FeatureMemo]:
    """A frozen tower's features of the batch's media, computed before the differentiated pass:
    inside it every array the tower made would stay alive (a traced graph is kept whole) for a
    backward pass that never reaches the tower. None when the tower trains or there are none."""
    if "pixel_values" not in inputs and "pixel_values_videos" not in inputs:
        return None
    if tree_flatten(model.visual.trainable_parameters()):
        return None
    memo = FeatureMemo(size=1 << 30)
    media = {k: inputs[k] for k in MEDIA_KEYS if k in inputs}
    model.encode_media(**media, memo=memo)
    mx.eval(list(memo.values()))
    return memo


# ---- memory -------------------------------------------------------------------------------------


def device_memory() -> int:
    info = mx.device_info()
    size = info.get("max_recommended_working_set_size") or info.get("memory_size")
    return int(size or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _bytes(tree) -> int:
    return sum(v.nbytes for _, v in tree_flatten(tree))


def step_memory(model: Model, tokens: int, frames: list, checkpoint: bool) -> int:
    """An estimate of the bytes a step over one conversation of `tokens` tokens whose media have
    `frames` (patch count of each frame) takes on top of the weights: the activations the
    backward pass keeps (per token and per layer: the projections', MLP's and attention
    scores' outputs; per patch and per block the same in the tower, one block's when the tower
    is frozen and runs before), and the logits. With checkpointing one layer's and one block's
    are kept whole, the others' inputs only."""
    cfg = model.config
    t, v = cfg.text_config, cfg.vision_config
    size = model.language_model.embed_tokens.weight.dtype.size
    if size < 2:  # quantized embeddings: the activations are the scales' dtype
        size = model.language_model.embed_tokens.scales.dtype.size
    heads = t.num_attention_heads
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
    width = 10 * t.hidden_size + 2 * (heads + t.num_key_value_heads) * head_dim
    layer = tokens * ((width + 4 * t.intermediate_size) * size + 2 * 4 * heads * tokens)
    logits = tokens * t.vocab_size * (size + 12)
    vision, frozen = 0, not tree_flatten(model.visual.trainable_parameters())
    for n in frames:
        block = n * ((10 * v.hidden_size + 4 * v.out_hidden_size) * size + 2 * 4 * v.num_heads * n)
        vision += block if checkpoint or frozen else block * len(model.visual.blocks)
    if checkpoint:
        kept = len(model.layers) * tokens * t.hidden_size * size + layer
        kept += 0 if frozen else len(model.visual.blocks) * sum(frames) * v.hidden_size * size
    else:
        kept = len(model.layers) * layer
    return kept + vision + logits


def check_memory(model: Model, data, args: TrainingArgs, progress=None):
    """Refuse, before training, a conversation that would not fit `max_memory` with the weights
    and optimizer state in a batch of `batch_size` like it; the sentence names the record and
    its largest image or video."""
    budget = args.max_memory or device_memory()
    trainable = _bytes(model.trainable_parameters())
    fixed = _bytes(model.parameters()) + 3 * trainable  # gradients and two moments
    merge = model.config.vision_config.spatial_merge_size**2
    for i in range(len(data)):
        example, conversation = data[i], data.conversations[i]
        frames = []
        for key in ("image_grid_thw", "video_grid_thw"):
            for t, h, w in np.asarray(example.media.get(key, np.zeros((0, 3)))).reshape(-1, 3):
                frames.append((int(t), int(h * w)))
        parts = [
            p
            for m in conversation.messages
            if isinstance(m["content"], list)
            for p in m["content"]
            if p["type"] in ("image", "video")
        ]
        # images first, then videos: the processor's order of the grids
        names = [p for p in parts if p["type"] == "image"] + [
            p for p in parts if p["type"] == "video"
        ]
        flat = [n for t, n in frames for _ in range(t)]
        need = fixed + args.batch_size * step_memory(
            model, len(example), flat, args.grad_checkpoint
        )
        if need > budget:
            worst = max(range(len(frames)), key=lambda j: frames[j][0] * frames[j][1], default=None)
            what = (
                f"its {names[worst]['type']} {names[worst]['at']} "
                f"({frames[worst][0] * frames[worst][1] // merge:,} tokens)"
                if worst is not None
                else f"its {len(example):,} tokens"
            )
            raise Glm4vError(
                f"{conversation.where}: {what} would need about {need / 1e9:.1f} GB to train "
                f"on, more than the {budget / 1e9:.1f} GB budget; use smaller images or fewer "
                "video frames, --grad-checkpoint, or a larger --max-memory."
            )
        if progress is not None:
            progress(i + 1, len(data))


# ---- checkpoints --------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_interrupt():
    """Ctrl-C waits until the checkpoint's files are all in place, then stops the run."""
    caught = []
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # ignored (nohup, a background job):
        yield  # it stays ignored here too, as outside the checkpoint
        return
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    except ValueError:  # not the main thread: signals cannot reach us here anyway
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def state_file(adapter_file) -> Path:
    """The optimizer state saved with an adapters file: `optimizer.safetensors` beside
    `adapters.safetensors`, `0000100_optimizer.safetensors` beside `0000100_adapters...`."""
    adapter_file = Path(adapter_file)
    return adapter_file.with_name(adapter_file.name.replace("adapters", "optimizer"))


def save_checkpoint(model, optimizer, settings: LoraSettings, path: Path, step: int):
    """Adapters, config and optimizer state (with the step) into `path`, as the numbered copy
    (`0000100_adapters.safetensors`) and as the latest; each file written aside and moved in
    whole, so an interrupted save leaves the previous checkpoint as it was."""
    path.mkdir(parents=True, exist_ok=True)
    with _no_interrupt():
        aside = Path(tempfile.mkdtemp(prefix=".saving-", dir=path))
        try:
            save_adapters(model, aside, settings)
            mx.save_safetensors(
                str(aside / STATE),
                dict(tree_flatten(optimizer.state)),
                metadata={"step": str(step)},
            )
            numbered = f"{step:07d}_"
            for name in (STATE, OURS):
                shutil.copyfile(aside / name, aside / (numbered + name))
                os.replace(aside / (numbered + name), path / (numbered + name))
            for name in ("adapter_config.json", STATE, OURS):
                os.replace(aside / name, path / name)
        finally:
            shutil.rmtree(aside, ignore_errors=True)


def resume(model, optimizer, adapter_file) -> int:
    """Load a checkpoint's adapter weights (mlx-lm's `--resume-adapter-file`) and, when saved
    beside them, the optimizer's state; the step to continue after (0 without a state)."""
    adapter_file = Path(adapter_file)
    if not adapter_file.is_file():
        raise Glm4vError(f"--resume-adapter-file {adapter_file} is not a file.")
    try:
        weights = mx.load(str(adapter_file))
    except Exception as e:
        raise Glm4vError(f"{adapter_file} could not be read as safetensors: {e}.") from None
    params = dict(tree_flatten(model.parameters()))
    for name, value in weights.items():
        if name not in params or params[name].shape != value.shape:
            raise Glm4vError(
                f"{adapter_file}: {name} is not a parameter of this run's shape "
                "(the adapter was trained with other --fine-tune-type, rank or layers)."
            )
    model.load_weights(list(weights.items()), strict=False)
    state = state_file(adapter_file)
    if not state.is_file():
        return 0
    tensors, metadata = mx.load(str(state), return_metadata=True)
    optimizer.state = tree_unflatten(list(tensors.items()))
    return int(metadata.get("step", 0))


# ---- the loop -----------------------------------------------------------------------------------


def evaluate(model: Model, data, args: TrainingArgs) -> float:
    """Validation loss: the mean over the labelled tokens of the first `val_batches` batches
    (all of them for -1), in file order."""
    batches = max(1, len(data) // args.batch_size)
    if args.val_batches > 0:
        batches = min(batches, args.val_batches)
    model.eval()
    total, count = mx.array(0.0), 0
    for b in range(batches):
        rows = range(b * args.batch_size, min(len(data), (b + 1) * args.batch_size))
        examples = [data[i] for i in rows]
        batch = collate(examples, data.processor.tokenizer.pad_token_id)
        total = total + model(**model_inputs(batch), num_items=1).loss
        mx.eval(total)
        count += counted(batch["labels"])
    return float(total) / max(count, 1)


def _step(model, loss_and_grad, optimizer, data, args: TrainingArgs, step: int) -> Report:
    """One optimizer step: its micro-batches' losses and gradients summed, then the update."""
    began = time.perf_counter()
    model.train()
    mx.random.seed(args.seed * 1_000_003 + step)  # dropout: the same whether resumed or not
    first = (step - 1) * args.grad_accumulation_steps
    pad = data.processor.tokenizer.pad_token_id
    batches = [
        collate([data[i] for i in batch_indices(len(data), args.batch_size, args.seed, k)], pad)
        for k in range(first, first + args.grad_accumulation_steps)
    ]
    data_seconds = time.perf_counter() - began
    num_items = max(1, sum(counted(b["labels"]) for b in batches))
    loss, grads = mx.array(0.0), None
    for batch in batches:
        inputs = model_inputs(batch)
        part, g = loss_and_grad(model, inputs, num_items, frozen_features(model, inputs))
        loss = loss + part
        grads = g if grads is None else tree_map(mx.add, grads, g)
        mx.eval(loss, grads)
    lr = float(optimizer.learning_rate)
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state)
    seconds = time.perf_counter() - began
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    peak = mx.get_peak_memory() / 1e9
    rate = tokens / seconds
    return Report(step, float(loss), lr, tokens, rate, peak, None, seconds, data_seconds)


def train(
    model: Model,
    train_data,
    args: TrainingArgs,
    settings: LoraSettings,
    adapter_path,
    valid_data=None,
    resume_adapter_file=None,
    optimizer: Optional[optim.Optimizer] = None,
    report: Optional[Callable[[Report], None]] = None,
) -> list:
    """Train the model's trainable parameters (`apply_lora` or a loaded adapter made them so)
    for `args.iters` steps, checkpointing into `adapter_path`; the steps' `Report`s."""
    if len(train_data) < args.batch_size:
        raise Glm4vError(
            f"the training data has {len(train_data)} conversations, fewer than --batch-size "
            f"{args.batch_size}."
        )
    if not tree_flatten(model.trainable_parameters()):
        raise Glm4vError("the model has no trainable parameters; apply_lora first.")
    adapter_path = Path(adapter_path)
    optimizer = optimizer or make_optimizer(args)
    start = resume(model, optimizer, resume_adapter_file) if resume_adapter_file else 0
    loss_and_grad = nn.value_and_grad(model, _loss)
    reports = []
    adapter_path.mkdir(parents=True, exist_ok=True)
    mx.reset_peak_memory()
    saved = done = start
    try:
        with grad_checkpointing(model, args.grad_checkpoint):
            for step in range(start + 1, args.iters + 1):
                r = _step(model, loss_and_grad, optimizer, train_data, args, step)
                if valid_data is not None and (
                    step % args.steps_per_eval == 0 or step == args.iters
                ):
                    r.val_loss = evaluate(model, valid_data, args)
                reports.append(r)
                if args.save_every and step % args.save_every == 0 or step == args.iters:
                    save_checkpoint(model, optimizer, settings, adapter_path, step)
                    saved = step
                with (adapter_path / LOG).open("a") as log:
                    log.write(json.dumps(asdict(r)) + "\n")
                done = step
                if report is not None:
                    report(r)
    except KeyboardInterrupt:
        raise Interrupted(done, saved) from None
    model.eval()
    return reports
