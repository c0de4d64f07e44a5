"""`finetune`: a checkpoint, a data directory or file and the settings -> a trained adapter.

What `mlx-glm4v finetune` runs and `from mlx_glm4v import finetune` calls: load the model
(quantized checkpoints make it QLoRA), put LoRA/DoRA layers in (or unfreeze all for full
fine-tuning), read and check the conversations, JSONL or a Hugging Face dataset directory (a
record too large for the memory budget is refused before the first step), then train
(trainer.py).
"""

from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from ..checkpoints.loader import load
from ..errors import Glm4vError
from .adapters import LoraSettings, apply_lora
from .data import ConversationData, read_jsonl
from .hf_dataset import is_dataset_dir, read_dataset
from .trainer import TrainingArgs, check_memory, train


def read_data(data) -> tuple:
    """(training conversations, validation conversations or None) of `--data`: a directory
    holding train.jsonl (and valid.jsonl), as mlx-lm's `lora` reads, a Hugging Face dataset
    directory (mlx-vlm's form, hf_dataset.py), or one JSONL file."""
    data = Path(data).expanduser()
    if data.is_dir():
        train_file, valid_file = data / "train.jsonl", data / "valid.jsonl"
        if train_file.is_file():
            return read_jsonl(train_file), read_jsonl(valid_file) if valid_file.is_file() else None
        if is_dataset_dir(data):
            return read_dataset(data)
        raise Glm4vError(
            f"the data directory {data} has no train.jsonl, nor the arrow or parquet files of a "
            "Hugging Face dataset."
        )
    if not data.is_file():
        raise Glm4vError(f"--data {data} is neither a JSONL file nor a directory.")
    return read_jsonl(data), None


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
    training, valid = read_data(data)
    train_set = ConversationData(training, processor, train_on_prompt, media_kwargs)
    valid_set = ConversationData(valid, processor, train_on_prompt, media_kwargs) if valid else None
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
