"""Reading VinVL checkpoints (maskrcnn_benchmark / scene_graph_benchmark key names, as released in
vinvl_vg_x152c4.pth) into VinvlModel's names, and VinVL's label map.

Released names -> ours:
  backbone.body.stem.conv1 / bn1               -> backbone.stem.conv1 / conv1.norm
  backbone.body.layerK.i.convJ / bnJ           -> backbone.res{K+1}.i.convJ / convJ.norm
  ....downsample.0 / downsample.1              -> ....shortcut / shortcut.norm
  rpn.anchor_generator.cell_anchors.0          -> proposal_generator.anchor_generator.cell_anchors.0
  rpn.head.conv / cls_logits / bbox_pred       -> proposal_generator.rpn_head.conv / objectness_logits / anchor_deltas
  roi_heads.box.feature_extractor.head.layer4  -> roi_heads.res5
  roi_heads.box.predictor.cls_score / bbox_pred -> roi_heads.box_predictor.cls_score / bbox_pred
  attribute.predictor.cls_embedding / fc_attr / attr_score -> roi_heads.box_predictor.cls_embed / attr_linear1 / attr_linear2
  attribute.feature_extractor.head.layer4      -> roi_heads.res5 as well (see _merge_res5)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ...errors import PrepError
from ...manifests.atomic import sha256_file

BOX_RES5 = "roi_heads.box.feature_extractor.head.layer4."
ATTR_RES5 = "attribute.feature_extractor.head.layer4."
_FIXED = {
    "rpn.anchor_generator.cell_anchors.0": "proposal_generator.anchor_generator.cell_anchors.0",
    "rpn.head.conv.": "proposal_generator.rpn_head.conv.",
    "rpn.head.cls_logits.": "proposal_generator.rpn_head.objectness_logits.",
    "rpn.head.bbox_pred.": "proposal_generator.rpn_head.anchor_deltas.",
    "roi_heads.box.predictor.cls_score.": "roi_heads.box_predictor.cls_score.",
    "roi_heads.box.predictor.bbox_pred.": "roi_heads.box_predictor.bbox_pred.",
    "attribute.predictor.cls_embedding.": "roi_heads.box_predictor.cls_embed.",
    "attribute.predictor.fc_attr.": "roi_heads.box_predictor.attr_linear1.",
    "attribute.predictor.attr_score.": "roi_heads.box_predictor.attr_linear2.",
}
_BLOCK = re.compile(r"^(\d+)\.(conv[123]\.weight|bn([123])\.(.+)|downsample\.0\.weight|downsample\.1\.(.+))$")
BUTD_MARKERS = ("proposal_generator.rpn_head.conv.weight", "backbone.res2.0.conv1.weight", "backbone.stem.conv1.weight")
VINVL_MARKERS = ("backbone.body.stem.conv1.weight", "rpn.head.conv.weight")


def is_vinvl_layout(sd: dict) -> bool:
    return any(k.removeprefix("module.") in VINVL_MARKERS for k in sd)


def _block_key(rest: str) -> str | None:
    """`i.bn2.running_var` -> `i.conv2.norm.running_var` (inside one stage)."""
    m = _BLOCK.match(rest)
    if m is None:
        return None
    i, part = m.group(1), m.group(2)
    if part.startswith("conv"):
        return f"{i}.{part}"
    if part.startswith("bn"):
        return f"{i}.conv{m.group(3)}.norm.{m.group(4)}"
    if part == "downsample.0.weight":
        return f"{i}.shortcut.weight"
    return f"{i}.shortcut.norm.{m.group(5)}"


def rename_key(key: str) -> str | None:
    """Our name for a released key; None for a key this model has no place for."""
    for old, new in _FIXED.items():
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("backbone.body.stem."):
        rest = key[len("backbone.body.stem."):]
        if rest == "conv1.weight":
            return "backbone.stem.conv1.weight"
        if rest.startswith("bn1."):
            return "backbone.stem.conv1.norm." + rest[4:]
        return None
    m = re.match(r"^backbone\.body\.layer([1-3])\.(.+)$", key)
    if m:
        inner = _block_key(m.group(2))
        return None if inner is None else f"backbone.res{int(m.group(1)) + 1}.{inner}"
    for prefix in (BOX_RES5, ATTR_RES5):
        if key.startswith(prefix):
            inner = _block_key(key[len(prefix):])
            return None if inner is None else f"roi_heads.res5.{inner}"
    return None


def convert_vinvl(raw: dict, source) -> tuple[dict, list[str]]:
    """-> (state dict in VinvlModel names, released keys with no place). The box head's and the
    attribute head's res5 are one module in scene_graph_benchmark (SHARE_BOX_FEATURE_EXTRACTOR):
    both are saved, and loading copies the roi_heads one first, then the attribute one into the
    same tensors, so the attribute copy is what the reference computes with (released files hold
    two equal copies)."""
    raw = {k.removeprefix("module."): v for k, v in raw.items()}
    if not any(k in raw for k in VINVL_MARKERS):
        if any(k in raw for k in BUTD_MARKERS):
            raise PrepError(f"{source}: is a BUTD checkpoint (detectron2 key names), not VinVL's; "
                            "use --model butd-r101 (or a butd-vg-* name) for it")
        raise PrepError(f"{source}: has none of {', '.join(VINVL_MARKERS)}: not a VinVL "
                        "(maskrcnn_benchmark) checkpoint such as vinvl_vg_x152c4.pth")
    sd, unplaced = {}, []
    for key in sorted(raw, key=lambda k: k.startswith(ATTR_RES5)):  # attribute copy last: it wins
        new = rename_key(key)
        if new is None:
            unplaced.append(key)
        else:
            sd[new] = raw[key]
    return sd, unplaced


def implied_config(sd: dict) -> dict:
    """VinvlConfig fields the weights fix: class/attribute counts, depth and widths."""
    def blocks(prefix):
        found = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
        return 1 + max(found) if found else 0

    conv2 = sd["backbone.res2.0.conv2.weight"]
    groups = conv2.shape[0] // conv2.shape[1]
    return {"num_classes": sd["roi_heads.box_predictor.cls_score.weight"].shape[0],
            "num_attrs": sd["roi_heads.box_predictor.attr_linear2.weight"].shape[0],
            "cls_embed_dim": sd["roi_heads.box_predictor.cls_embed.weight"].shape[1],
            "attr_hidden": sd["roi_heads.box_predictor.attr_linear1.weight"].shape[0],
            "stage_blocks": tuple(blocks(f"backbone.res{i}.") for i in (2, 3, 4)),
            "res5_blocks": blocks("roi_heads.res5."),
            "stem_channels": sd["backbone.stem.conv1.weight"].shape[0],
            "num_groups": groups, "width_per_group": conv2.shape[0] // groups,
            "res2_out": sd["backbone.res2.0.conv3.weight"].shape[0],
            "rpn_channels": sd["proposal_generator.rpn_head.conv.weight"].shape[0]}


def read_vinvl_checkpoint(path) -> tuple[dict, list[str], dict, str]:
    """(state dict, unplaced released keys, config overrides, sha256 of the file)."""
    from ..checkpoints import read_checkpoint_file
    raw = read_checkpoint_file(path)
    sd, unplaced = convert_vinvl(raw, path)
    try:
        overrides = implied_config(sd)
    except KeyError as exc:
        raise PrepError(f"{path}: VinVL checkpoint lacks {exc.args[0]} (after renaming); "
                        "pass the complete vinvl_vg_x152c4.pth") from exc
    return sd, unplaced, overrides, sha256_file(Path(path))


def read_label_map(path) -> tuple[list[str], list[str]]:
    """VG-SGG-dicts-vgoi6-clipped.json -> (class names, attribute names), index = model output
    index: [0] is background / no-attribute, names from idx_to_label / idx_to_attribute (string
    keys 1..N-1)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = []
        for key in ("idx_to_label", "idx_to_attribute"):
            table = {int(k): str(v) for k, v in data[key].items()}
            n = 1 + max(table)
            if sorted(table) != list(range(1, n)):
                raise ValueError(f"{key} keys are not 1..{n - 1}")
            names.append(["__background__" if key == "idx_to_label" else "__no_attribute__"]
                         + [table[i] for i in range(1, n)])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PrepError(f"{path}: not a VinVL label map (VG-SGG-dicts-vgoi6-clipped.json with "
                        f"idx_to_label and idx_to_attribute): {exc}") from exc
    return names[0], names[1]


def check_label_map(classes, attributes, num_classes: int, num_attrs: int, source) -> None:
    if (len(classes), len(attributes)) != (num_classes, num_attrs):
        raise PrepError(f"{source}: label map has {len(classes)} classes / {len(attributes)} "
                        f"attributes, the weights {num_classes} / {num_attrs}; pass the label map "
                        "released with these weights")


def load_state(model: torch.nn.Module, sd: dict, unplaced: list[str], source, strict: bool = True) -> list[str]:
    """BUTD's strict key check (missing, unexpected, shapes), with unplaced released keys counted
    as unexpected."""
    from ..checkpoints import load_into
    if unplaced and strict:
        raise PrepError(f"{source}: checkpoint does not match the model: unexpected {len(unplaced)}: "
                        f"{', '.join(unplaced[:8])}{' ...' if len(unplaced) > 8 else ''}; check --model "
                        "(vinvl-x152c4 for vinvl_vg_x152c4.pth)")
    return load_into(model, sd, source, strict) + ([f"unplaced {len(unplaced)}"] if unplaced else [])
