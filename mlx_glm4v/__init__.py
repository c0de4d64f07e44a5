"""GLM-4.1V on MLX.

    from mlx_glm4v import load, generate
    model, processor = load("zai-org/GLM-4.1V-9B-Thinking")

Attributes are imported on first use, so that `import mlx_glm4v` (and the processor alone)
stays light: mlx-lm pulls in transformers, which costs most of a second to import.
"""

import importlib

_EXPORTS = {
    "load": "loader",
    "Model": "model",
    "ModelConfig": "config",
    "Processor": "processor",
    "Glm4vError": "errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
