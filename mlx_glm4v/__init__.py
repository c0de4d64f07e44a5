"""GLM-4.1V on MLX.

    from mlx_glm4v import load, generate
    model, processor = load("zai-org/GLM-4.1V-9B-Thinking")
    print(generate(model, processor, "Describe this image.", images=["cat.jpg"]))

Names are imported on first use, so that `import mlx_glm4v` (and the processor alone) stays
light: mlx-lm pulls in transformers, which costs most of a second to import. Each name lives in
the wing that does its work (DESIGN.md); these are the ones to import.
"""

import importlib

_EXPORTS = {
    "load": "checkpoints.loader",
    "convert": "checkpoints.convert",
    "load_adapter": "checkpoints.adapters",
    "read_adapter": "checkpoints.adapters",
    "fuse": "checkpoints.adapters",
    "LoraSettings": "tuning.adapters",
    "apply_lora": "tuning.adapters",
    "save_adapters": "tuning.adapters",
    "export_peft": "tuning.adapters",
    "generate": "generation.generate",
    "stream_generate": "generation.generate",
    "GenerationSettings": "generation.settings",
    "ChatSession": "generation.chat",
    "Constraint": "generation.constrain",
    "split_reply": "generation.reply",
    "ReplySplitter": "generation.reply",
    "ReplyParser": "generation.reply",
    "parse_reply": "generation.reply",
    "find_marks": "generation.grounding",
    "draw_marks": "generation.grounding",
    "batch_generate": "serving.engine",
    "Engine": "serving.engine",
    "Model": "models.model",
    "ModelConfig": "models.config",
    "Processor": "inputs.processor",
    "unmark": "inputs.processor",
    "Glm4vError": "errors",
    "load_layout": "documents.layout",
    "Layout": "documents.layout",
    "ocr": "documents.pipeline",
    "OcrSettings": "documents.pipeline",
    "Reader": "documents.pipeline",
    "finetune": "tuning.finetune",
}
# Modules used whole: `distributed.load`, `distributed.share_request` on every rank.
_MODULES = {"distributed": "serving.distributed"}

__all__ = list(_EXPORTS) + list(_MODULES)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _MODULES:
        return importlib.import_module(f".{_MODULES[name]}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
