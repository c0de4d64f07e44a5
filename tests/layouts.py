"""Tiny PP-DocLayoutV3 checkpoints built with transformers whose detections are scripted: each of
the first query slots gives one region (a label, a box in fractions of the page, a place in the
reading order) on every page, so that the pipeline's merging and formatting rules see several
regions of several labels per page."""

import numpy as np
import torch
from test_layout_model import tiny_config
from transformers import PPDocLayoutV3ForObjectDetection, PPDocLayoutV3ImageProcessor

# the published checkpoint's labels, in its order (the GLM-OCR SDK maps them to tasks by name)
LABELS = (
    "abstract algorithm aside_text chart content display_formula doc_title figure_title footer "
    "footer_image footnote formula_number header header_image image inline_formula number "
    "paragraph_title reference reference_content seal table text vertical_text vision_footnote"
).split()
QUERIES = 12
SHIFT = 5.0  # past any layer-normed feature of 16 (at most sqrt(15) from 0)


def _logit(p):
    return np.log(p / (1 - p))


def _affine(features: np.ndarray, targets: np.ndarray):
    """(weight, bias) of the linear map taking each row of features to its row of targets
    exactly (as many rows as features have dimensions + 1, or fewer)."""
    a = np.concatenate([features, np.ones((len(features), 1))], axis=1)
    solution = np.linalg.lstsq(a, targets, rcond=None)[0]
    return torch.tensor(solution[:-1].T.copy()), torch.tensor(solution[-1].copy())


def scripted_layout(path, regions: list, page, seed: int = 0):
    """A checkpoint at `path` that finds `regions` -- (label, (x0, y0, x1, y1) as fractions of
    the page) in reading order -- on `page` (a PIL image; pages like it in the 128x128 the
    detector sees give the same), each scoring 0.9975, every other slot under 0.001.

    The decoder's layers add nothing (their output projections are zero), so each query slot
    carries the encoder's feature at the place it was picked; the model is run once on `page`
    to read those, and the class, box and reading-order heads are solved to map them to the
    script. `page` needs texture everywhere, so that the places differ."""
    assert len(regions) <= QUERIES
    config = tiny_config()
    config.id2label, config.label2id = dict(enumerate(LABELS)), {n: i for i, n in enumerate(LABELS)}
    config.num_queries, config.tie_word_embeddings = QUERIES, False  # the heads are the script's
    torch.manual_seed(seed)
    model = PPDocLayoutV3ForObjectDetection(config).eval()
    processor = PPDocLayoutV3ImageProcessor(size={"height": 128, "width": 128})
    m, d = model.model, config.d_model
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, float(np.prod(p.shape[1:])) ** -0.5)
        for layer in m.decoder.layers:
            for proj in (layer.self_attn.o_proj, layer.encoder_attn.output_proj, layer.mlp.fc2):
                proj.weight.zero_()
                proj.bias.zero_()
            for norm in (layer.self_attn_layer_norm, layer.encoder_attn_layer_norm):
                norm.weight.fill_(1.0)  # each layer's output the same: its input, normed
                norm.bias.zero_()
            layer.final_layer_norm.weight.fill_(1.0)
            layer.final_layer_norm.bias.zero_()
        seen, pixels = {}, processor(page, return_tensors="pt")
        # the encoder's features differ little from place to place: whiten them, so that the
        # places picked differ in every direction and the solved heads stay small
        hook = m.enc_output.register_forward_hook(lambda *a: seen.update(memory=a[1][0]))
        model(**pixels)
        hook.remove()
        memory = seen["memory"][0].double().numpy()
        values, vectors = np.linalg.eigh(np.cov(memory.T) + 1e-9 * np.eye(d))
        whiten = vectors @ np.diag(values**-0.5) @ vectors.T
        linear = m.enc_output[0]
        linear.weight.copy_(torch.tensor(whiten))
        linear.bias.copy_(torch.tensor(-whiten @ memory.mean(0)))
        m.decoder.register_forward_pre_hook(
            lambda _, args, kwargs: seen.update(start=kwargs["reference_points"]), with_kwargs=True
        )
        m.decoder.layers[-1].register_forward_hook(lambda *a: seen.update(hidden=a[2]))
        m.decoder_norm.register_forward_hook(lambda *a: seen.update(normed=a[2]))
        model(**pixels)
        # the first reference box as the first layer sees it: the decoder takes its sigmoid
        # and the layer its logit again, in float32 (not the identity near 0 and 1)
        start = seen["start"].sigmoid()
        seen["start"] = torch.log(start.clamp(min=1e-5) / (1 - start).clamp(min=1e-5))
        hidden, normed, start = (seen[k][0].double().numpy() for k in ("hidden", "normed", "start"))
        logits = np.full((QUERIES, len(LABELS)), -8.0)
        for q, (label, _) in enumerate(regions):
            logits[q, LABELS.index(label)] = 6.0
        m.decoder.class_embed.weight[:], m.decoder.class_embed.bias[:] = _affine(normed, logits)
        # the box head, applied by both layers to the first reference box (`start`, logits):
        # two identity layers shifted clear of their ReLUs, then each box's half delta
        head = m.decoder.bbox_embed.layers
        for layer, shift in zip(head[:2], (SHIFT, 0.0)):
            layer.weight.copy_(torch.eye(d))
            layer.bias.fill_(shift)
        deltas = np.zeros((QUERIES, 4))
        width, height = page.size
        for q, (_, edges) in enumerate(regions):
            # each edge mid-pixel on `page`: a rounding difference cannot move it a pixel
            x0, x1 = ((np.floor(v * width) + 0.5) / width for v in edges[::2])
            y0, y1 = ((np.floor(v * height) + 0.5) / height for v in edges[1::2])
            box = np.array([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
            deltas[q] = (_logit(box) - start[q]) / 2
        scripted = len(regions)  # the other slots' boxes are never seen
        weight, bias = _affine(hidden[:scripted], deltas[:scripted])
        head[2].weight[:], head[2].bias[:] = weight, bias - SHIFT * weight.sum(1)
        # the reading order: the global pointer's logits 4 * (rank_j - rank_i)
        for order in m.decoder_order_head:
            order.weight.copy_(torch.eye(d))
            order.bias.zero_()
        rank = np.array([q if q < len(regions) else QUERIES + q for q in range(QUERIES)], float)
        size = config.global_pointer_head_size
        queries, keys = np.zeros((QUERIES, size)), np.zeros((QUERIES, size))
        queries[:, 0], queries[:, 1] = 1.0, rank
        keys[:, 0], keys[:, 1] = 4.0 * size**0.5 * rank, -4.0 * size**0.5
        gp = m.decoder_global_pointer.dense
        gp.weight[:], gp.bias[:] = _affine(normed, np.concatenate([queries, keys], 1))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
