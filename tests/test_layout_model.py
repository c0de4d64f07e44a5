"""PP-DocLayoutV3 in MLX against transformers' `PPDocLayoutV3ForObjectDetection` and its image
processor, on a tiny random checkpoint written by `save_pretrained` at test time."""

import numpy as np
import pytest
import torch
from helpers import picture
from transformers import (
    PPDocLayoutV3Config,
    PPDocLayoutV3ForObjectDetection,
    PPDocLayoutV3ImageProcessor,
)

from mlx_glm4v import Glm4vError, load_layout
from mlx_glm4v.inputs.layout_image import layout_pixels

SIZE = 128  # the processor's fixed input size (the published one is 800)
LABELS = ["text", "table", "formula", "image", "header"]


def tiny_config() -> PPDocLayoutV3Config:
    channels = [16, 16, 24, 32]
    return PPDocLayoutV3Config(
        backbone_config=dict(
            model_type="hgnet_v2",
            stem_channels=[3, 8, 8],
            stage_in_channels=[8, 16, 16, 24],
            stage_mid_channels=[8, 8, 8, 8],
            stage_out_channels=channels,
            hidden_sizes=channels,
            stage_num_blocks=[1, 1, 2, 1],
            stage_numb_of_layers=[2, 2, 2, 2],
            use_learnable_affine_block=True,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        ),
        encoder_in_channels=channels[1:],
        x4_feat_dim=channels[0],
        encoder_hidden_dim=16,
        encoder_ffn_dim=32,
        encoder_attention_heads=2,
        d_model=16,
        decoder_in_channels=[16] * 3,
        decoder_ffn_dim=32,
        decoder_layers=2,
        decoder_attention_heads=2,
        decoder_n_points=2,
        num_queries=20,
        num_prototypes=8,
        mask_feature_channels=[8, 8],
        global_pointer_head_size=8,
        num_denoising=0,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, transformers' model, its processor): weights drawn at a scale where scores,
    boxes, masks and orders all vary (the init's are nearly constant), batch norms not identity."""
    torch.manual_seed(0)
    model = PPDocLayoutV3ForObjectDetection(tiny_config()).eval()
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, float(np.prod(p.shape[1:])) ** -0.5)
            else:
                p.add_(torch.randn_like(p) * 0.1)
        # labels likely enough that the page has regions above the threshold
        model.model.enc_score_head.bias.copy_(torch.tensor([2.0, 1.0, 1.5, 0.5, 1.0]))
        for m in model.modules():
            if getattr(m, "running_var", None) is not None:
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("layout")
    model.save_pretrained(path)
    processor = PPDocLayoutV3ImageProcessor(size={"height": SIZE, "width": SIZE})
    processor.save_pretrained(path)
    return path, model, processor


@pytest.fixture(scope="module")
def layout(checkpoint):
    return load_layout(str(checkpoint[0]))


def pages():
    """Pages smaller and larger than the input size, neither square."""
    return [picture(h, w, seed=h) for h, w in [(90, 70), (300, 217)]]


def test_pixels_equal_the_processor():
    processor = PPDocLayoutV3ImageProcessor(size={"height": SIZE, "width": SIZE})
    for page in pages() + [picture(800, 600, seed=3)]:
        ours, size = layout_pixels(page, (SIZE, SIZE))
        theirs = processor(page, return_tensors="pt").pixel_values.permute(0, 2, 3, 1).numpy()
        assert size == (page.height, page.width)
        np.testing.assert_array_equal(ours, theirs)


def reference(checkpoint, page):
    _, model, processor = checkpoint
    with torch.no_grad():
        return model(**processor(page, return_tensors="pt"))


def test_raw_outputs_equal_transformers(checkpoint, layout):
    for page in pages():
        ours, _ = layout.raw(page)
        theirs = reference(checkpoint, page)
        for name in ("logits", "pred_boxes", "order_logits", "out_masks"):
            a, b = np.array(getattr(ours, name)), getattr(theirs, name).numpy()
            assert a.shape == b.shape, name
            assert np.abs(a - b).max() < 1e-4, name
        assert theirs.pred_boxes.std() > 0.05  # the comparison can fail


def test_detections_equal_transformers(checkpoint, layout):
    pytest.importorskip("cv2")
    _, _, processor = checkpoint
    for page in pages():
        ours = layout.detect(page, threshold=0.5)
        theirs = processor.post_process_object_detection(
            reference(checkpoint, page), threshold=0.5, target_sizes=[(page.height, page.width)]
        )[0]
        assert len(theirs["scores"]) > 3
        np.testing.assert_allclose(ours["scores"], theirs["scores"].numpy(), atol=1e-4)
        np.testing.assert_array_equal(ours["labels"], theirs["labels"].numpy())
        np.testing.assert_array_equal(ours["order_seq"], theirs["order_seq"].numpy())
        np.testing.assert_allclose(ours["boxes"], theirs["boxes"].numpy(), rtol=1e-4, atol=1e-3)
        assert len(ours["polygon_points"]) == len(theirs["polygon_points"])
        for a, b in zip(ours["polygon_points"], theirs["polygon_points"]):
            np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), atol=1e-3)


def test_regions_in_reading_order(layout):
    pytest.importorskip("cv2")
    page = pages()[1]
    found = layout(page, threshold=0.5)
    assert found and [r.order for r in found] == sorted(r.order for r in found)
    assert all(r.label == LABELS[r.label_id] and r.score >= 0.5 for r in found)
    assert all(r.box[0] <= r.box[2] and r.box[1] <= r.box[3] and len(r.polygon) >= 4 for r in found)
    strict = layout(page, threshold=0.5, thresholds={"text": 1.1})
    assert [r for r in found if r.label != "text"] == strict


def test_a_checkpoint_of_another_model_is_refused(checkpoint, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "glm4v"}')
    with pytest.raises(Glm4vError, match="not a PP-DocLayoutV3 layout detector"):
        load_layout(str(tmp_path))
