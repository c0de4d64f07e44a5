import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

from mlx_glm4v.checkpoints.loader import load  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (`item.rep_call`), so fixtures can tell a failure."""
    report = (yield).get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def glm4v_checkpoint(tmp_path_factory):
    """A tiny GLM-4.1V checkpoint saved by transformers, sharded with an index.

    Returns (path, torch model, transformers processor).
    """
    path = tmp_path_factory.mktemp("glm4v-tiny")
    model, processor = tiny.build_checkpoint(path, max_shard_size="400KB")
    return path, model, processor


@pytest.fixture(scope="session")
def glm4v_moe_checkpoint(tmp_path_factory):
    """A tiny GLM-4.5V (`glm4v_moe`) checkpoint, experts stored one by one, sharded with an
    index."""
    path = tmp_path_factory.mktemp("glm4v-moe-tiny")
    model, processor = tiny.build_checkpoint(path, max_shard_size="400KB", family="glm4v_moe")
    return path, model, processor


@pytest.fixture(scope="session")
def glm46v_checkpoint(tmp_path_factory):
    """A tiny `glm46v` checkpoint with the experts' text model, experts fused as transformers 5
    saves them."""
    path = tmp_path_factory.mktemp("glm46v-tiny")
    model, processor = tiny.build_checkpoint(path, family="glm46v")
    return path, model, processor


# What the scripted checkpoint answers: GLM-4.1V's form, a point in thousandths inside box markers.
BOX_SCRIPT = "<think>hm</think><answer>Nose: <|begin_of_box|>[250,600]<|end_of_box|></answer>"


@pytest.fixture(scope="session")
def box_checkpoint(glm4v_checkpoint, tmp_path_factory):
    """The tiny GLM-4.1V checkpoint rewired to reply BOX_SCRIPT to anything
    (tiny.scripted_checkpoint)."""
    return tiny.scripted_checkpoint(
        glm4v_checkpoint[0], tmp_path_factory.mktemp("box-script"), BOX_SCRIPT
    )


@pytest.fixture(scope="session")
def glm_ocr_checkpoint(tmp_path_factory):
    """A tiny GLM-OCR (`glm_ocr`) checkpoint in the hub's layout: one file, the
    multi-token-prediction layer appended after the last decoder layer, the published
    preprocessor_config.json and chat template."""
    path = tmp_path_factory.mktemp("glm-ocr-tiny")
    model, processor = tiny.build_checkpoint(path, family="glm_ocr", processor_layout="published")
    return path, model, processor


@pytest.fixture(scope="module")
def drafting(glm_ocr_checkpoint, tmp_path_factory):
    """The tiny GLM-OCR checkpoint whose MTP layer drafts "the same token again"
    (tiny.drafting_checkpoint): kept where the reply repeats, rejected elsewhere."""
    path = tiny.drafting_checkpoint(glm_ocr_checkpoint[0], tmp_path_factory.mktemp("drafting"))
    model, processor = load(str(path))
    return path, model, processor


@pytest.fixture(scope="session")
def glmga_checkpoint(tmp_path_factory):
    """A tiny `glmga` checkpoint: GLM-4.6V's model (here its dense text model) under its own
    model type."""
    path = tmp_path_factory.mktemp("glmga-tiny")
    model, processor = tiny.build_checkpoint(path, family="glmga")
    return path, model, processor
