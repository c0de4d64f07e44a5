"""GLM-4.1V on MLX.

    from mlx_glm4v import load, generate
    model, processor = load("zai-org/GLM-4.1V-9B-Thinking")
    print(generate(model, processor, "Describe this image.", images=["cat.jpg"]))

Names are imported on first use, so that `import mlx_glm4v` (and the processor alone) stays
light: mlx-lm pulls in transformers, which costs most of a second to import.
"""

import importlib
import sys
import types

_EXPORTS = {
    "load": "checkpoints.loader",
    "generate": "generation.generate",
    "stream_generate": "generation.generate",
    "batch_generate": "serving.engine",
    "Engine": "serving.engine",
    "ChatSession": "generation.chat",
    "GenerationSettings": "generation.settings",
    "split_reply": "generation.reply",
    "ReplySplitter": "generation.reply",
    "ReplyParser": "generation.reply",
    "parse_reply": "generation.reply",
    "convert": "checkpoints.convert",
    "Model": "models.model",
    "ModelConfig": "models.config",
    "Processor": "inputs.processor",
    "Glm4vError": "errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """`generate` and `convert` name both a function and its module. Importing a submodule binds
    its name on the package, which would hide the function; keep those names for the functions."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
