import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def glm4v_checkpoint(tmp_path_factory):
    """A tiny GLM-4.1V checkpoint saved by transformers, sharded with an index.

    Returns (path, torch model, transformers processor).
    """
    path = tmp_path_factory.mktemp("glm4v-tiny")
    model, processor = tiny.build_checkpoint(path, max_shard_size="400KB")
    return path, model, processor
