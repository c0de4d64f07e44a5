"""`finetune`: a checkpoint, a data directory or file and the settings -> a trained adapter.

What `mlx-glm4v finetune` runs and `from mlx_glm4v import finetune` calls: load the model
(quantized checkpoints make it QLoRA), put LoRA/DoRA layers in (or unfreeze all for full
fine-tuning), read and check the conversations (a record too large for the memory budget is
refused before the first step), then train (trainer.py).
"""

from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from ..checkpoints.loader import load
from ..errors import Glm4vError
from .adapters import LoraSettings, apply_lora
from .data import ConversationData
from .trainer import TrainingArgs, check_memory, train


def data_files(data) -> tuple:
    """(train file, validation file or None) of `--data`: a directory holding train.jsonl (and
    valid.jsonl), as mlx-lm's `lora` reads, or one JSONL file."""
    data = Path(data).expanduser()
    if data.is_dir():
        train_file, valid_file = data / "train.jsonl", data / "valid.jsonl"
        if not train_file.is_file():
            raise Glm4vError(f"the data directory {data} has no train.jsonl.")
        return train_file, valid_file if valid_file.is_file() else None
    if not data.is_file():
        raise Glm4vError(f"--data {data} is neither a JSONL file nor a directory.")
    return data, None


def finetune(
    model: str,
    data,
    adapter_path="adapters",
    settings: LoraSettings = LoraSettings(),
    args: TrainingArgs = TrainingArgs(),
    train_on_prompt: bool = False,
    resume_adapter_file=None,
    media_kwargs: Optional[dict] = None,
    report: Optional[Callable] = None,
    checking: Optional[Callable] = None,
) -> list:
    """Fine-tune checkpoint `model` (a directory or hub id) on `data` and write the adapter to
    `adapter_path`; the steps' `Report`s. `report` hears each step, `checking(done, total)` the
    data check before training."""
    mx.random.seed(args.seed)  # the fresh LoRA factors
    net, processor = load(model)
    apply_lora(net, settings)
    train_file, valid_file = data_files(data)
    train_set = ConversationData(train_file, processor, train_on_prompt, media_kwargs)
    valid_set = (
        ConversationData(valid_file, processor, train_on_prompt, media_kwargs)
        if valid_file
        else None
    )
    check_memory(net, train_set, args, checking)
    return train(
        net,
        train_set,
        args,
        settings,
        adapter_path,
        valid_set,
        resume_adapter_file=resume_adapter_file,
        report=report,
    )
