"""Reading BUTD checkpoints in the formats people have, into the key names of butd.model.ButdModel.

Formats (detected from the file's suffix and its keys):
- "milvlg":  MILVLG bottom-up-attention.pytorch .pth, {'model': state_dict} or bare; Caffe RPN with
             2A objectness channels (background half, foreground half) and the Caffe anchors
             stored under proposal_generator.anchor_generator.cell_anchors.0. Names used as is.
- "py-bua":  py-bottom-up-attention .pkl (faster_rcnn_from_caffe[_attr].pkl): pickled dict of
             numpy arrays, read with teranprep.safe_pickle (no code runs); sigmoid RPN (A
             channels), attribute head named cls_embedding / fc_attr / attr_score, no anchors
             stored: its detectron2 fork generates them (sizes 64..512, size-major, centred at 0).
- "d2-zoo":  detectron2 model-zoo C4 checkpoints (.pkl {'model': numpy dict, '__author__'} or
             .pth): sigmoid RPN with 15 anchors, fg-only box regression, no attributes, res5 with
             stride 2, R50 or R101 (depth and widths are read off the keys). Its weights run
             through BUTD's Caffe-convention code (ROIPool, +1 boxes),
             which is close to but not detectron2's own inference (use --backend detectron2).
A sigmoid logit l becomes the softmax pair (0, l): softmax gives sigmoid(l) for the foreground.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import PrepError
from ..manifests.atomic import sha256_file

ANCHORS_KEY = "proposal_generator.anchor_generator.cell_anchors.0"
OBJ = "proposal_generator.rpn_head.objectness_logits"
DELTAS = "proposal_generator.rpn_head.anchor_deltas"
PRED = "roi_heads.box_predictor"
IGNORED_SUFFIXES = ("num_batches_tracked",)
IGNORED_KEYS = ("pixel_mean", "pixel_std")
PY_BUA_RENAMES = {f"{PRED}.cls_embedding.": f"{PRED}.cls_embed.",
                  f"{PRED}.fc_attr.": f"{PRED}.attr_linear1.",
                  f"{PRED}.attr_score.": f"{PRED}.attr_linear2."}


TRAINED_FORMAT = "teranprep.butd-checkpoint"  # written by `prep train-detector`


def read_checkpoint_file(path, with_config: bool = False):
    """The raw name -> tensor dict of a .pth/.pt (torch, weights_only) or .pkl (safe pickle) file.

    with_config: (dict, recorded ButdConfig overrides), the latter from a train-detector
    checkpoint's "config" entry (input size, pooler, proposal counts...; {} for other files).
    """
    from ..safe_pickle import safe_load_file
    from ..safe_torch import load_torch_file
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"{path}: checkpoint not found; pass an existing file to --weights")
    if path.suffix == ".pkl":
        try:
            obj = safe_load_file(path)
        except PrepError:
            raise
        except Exception as exc:  # noqa: BLE001 - a text file, a truncated pickle, another format
            from ..filetypes import describe_file
            raise PrepError(f"{path}: is {describe_file(path)}, not a pickled detector checkpoint "
                            f"({type(exc).__name__}); pass a py-bottom-up-attention or detectron2 "
                            ".pkl (a truncated download? download it again)") from exc
    else:
        obj = load_torch_file(path, expected="a detector checkpoint")
    recorded = {}
    if isinstance(obj, dict) and obj.get("format") == TRAINED_FORMAT and isinstance(obj.get("config"), dict):
        recorded = {k: tuple(v) if isinstance(v, list) else v for k, v in obj["config"].items()}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise PrepError(f"{path}: expected a (non-empty) dict of weights, found {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            continue  # bookkeeping entries (e.g. '__author__' strings) are not weights
        out[str(key)] = value
    return (out, recorded) if with_config else out


def detect_format(sd: dict) -> str:
    from .vinvl.checkpoint import is_vinvl_layout
    if is_vinvl_layout(sd):
        raise PrepError("is a VinVL checkpoint (maskrcnn_benchmark key names: backbone.body..., "
                        "rpn.head...), not BUTD's; use --model vinvl-x152c4 (or vinvl-vg-x152c4) for it")
    for key in (f"{OBJ}.weight", f"{DELTAS}.weight", f"{PRED}.cls_score.weight", f"{PRED}.bbox_pred.weight"):
        if key not in sd:
            raise PrepError(f"checkpoint has no {key}: not a Faster R-CNN C4 checkpoint in detectron2 "
                            "naming (MILVLG .pth, py-bottom-up-attention .pkl, detectron2 model zoo)")
    n_obj = sd[f"{OBJ}.weight"].shape[0]
    n_anchor = sd[f"{DELTAS}.weight"].shape[0] // 4
    n_cls = sd[f"{PRED}.cls_score.weight"].shape[0]
    if n_obj == 2 * n_anchor:
        return "milvlg"
    if sd[f"{PRED}.bbox_pred.weight"].shape[0] == 4 * (n_cls - 1):
        return "d2-zoo"
    return "py-bua"


def d2_cell_anchors(sizes, ratios) -> torch.Tensor:
    """detectron2's cell anchors: size-major, centred at 0, w = sqrt(size^2 / ratio), h = w * ratio."""
    out = []
    for size in sizes:
        for ratio in ratios:
            w = (size * size / ratio) ** 0.5
            h = w * ratio
            out.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(out, dtype=torch.float32)


def _depth_and_widths(sd) -> dict:
    """Blocks per stage and widths read off the keys: the model zoo has R50 and R101 C4 models."""
    def blocks(prefix):
        found = [int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)]
        return 1 + max(found) if found else None

    counts = [blocks(f"backbone.res{i}.") for i in (2, 3, 4)] + [blocks("roi_heads.res5.")]
    if None in counts:
        return {}
    return {"stage_blocks": tuple(counts[:3]), "res5_blocks": counts[3],
            "stem_channels": sd["backbone.stem.conv1.weight"].shape[0],
            "res2_bottleneck": sd["backbone.res2.0.conv1.weight"].shape[0],
            "rpn_channels": sd["proposal_generator.rpn_head.conv.weight"].shape[0]}


def _sigmoid_to_softmax_pair(sd):
    for suffix in ("weight", "bias"):
        fg = sd[f"{OBJ}.{suffix}"]
        sd[f"{OBJ}.{suffix}"] = torch.cat([torch.zeros_like(fg), fg], 0)


def convert_checkpoint(raw: dict) -> tuple[dict, dict, str]:
    """(state dict in ButdModel names, ButdConfig overrides the weights imply, format name)."""
    fmt = detect_format(raw)
    sd = {k: v for k, v in raw.items()
          if not k.endswith(IGNORED_SUFFIXES) and k not in IGNORED_KEYS}
    n_cls = sd[f"{PRED}.cls_score.weight"].shape[0]
    overrides = {"num_classes": n_cls}
    if fmt == "py-bua":
        for old, new in PY_BUA_RENAMES.items():
            for key in [k for k in sd if k.startswith(old)]:
                sd[new + key[len(old):]] = sd.pop(key)
        _sigmoid_to_softmax_pair(sd)
        sd.setdefault(ANCHORS_KEY, d2_cell_anchors((64, 128, 256, 512), (0.5, 1.0, 2.0)))
    elif fmt == "d2-zoo":
        _sigmoid_to_softmax_pair(sd)
        n_anchor = sd[f"{DELTAS}.weight"].shape[0] // 4
        sizes = (32, 64, 128, 256, 512)[:n_anchor // 3] if n_anchor % 3 == 0 else ()
        sd.setdefault(ANCHORS_KEY, d2_cell_anchors(sizes, (0.5, 1.0, 2.0)))
        for suffix in ("weight", "bias"):  # background rows for the class-specific regression
            fg = sd[f"{PRED}.bbox_pred.{suffix}"]
            sd[f"{PRED}.bbox_pred.{suffix}"] = torch.cat([torch.zeros_like(fg[:4]), fg], 0)
        overrides.update(res5_stride=2, res5_dilation=1, **_depth_and_widths(sd))
    if f"{PRED}.attr_linear2.weight" in sd:
        overrides.update(num_attrs=sd[f"{PRED}.attr_linear2.weight"].shape[0],
                         cls_embed_dim=sd[f"{PRED}.cls_embed.weight"].shape[1],
                         attr_hidden=sd[f"{PRED}.attr_linear1.weight"].shape[0])
    else:
        overrides["num_attrs"] = 0
    n_anchor = sd[ANCHORS_KEY].shape[0] if ANCHORS_KEY in sd else None
    if n_anchor is not None and n_anchor != 12:
        # ratios x scales only sets the count; the anchors themselves come from the state dict
        overrides.update(anchor_ratios=(0.5, 1.0, 2.0), anchor_scales=tuple(2.0 ** i for i in range(1, 1 + n_anchor // 3)))
    return sd, overrides, fmt


def check_state_dict(model: torch.nn.Module, sd: dict, source: str, strict: bool = True) -> list[str]:
    """Raises PrepError naming missing / unexpected / mis-shaped keys (strict); returns warnings."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k} {tuple(sd[k].shape)} (model {tuple(expected[k].shape)})"
                   for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}"
                        f"{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append(f"wrong shape {len(wrong)}: {', '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}")
    if wrong or (strict and problems):
        raise PrepError(f"{source}: checkpoint does not match the model: {'; '.join(problems)}; "
                        "check --model (e.g. butd-r101 for the published weights)")
    return problems


def load_into(model: torch.nn.Module, sd: dict, source: str, strict: bool = True) -> list[str]:
    warnings = check_state_dict(model, sd, source, strict)
    expected = model.state_dict()
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items() if k in expected},
                          strict=strict)
    return warnings


def read_butd_checkpoint(path) -> tuple[dict, dict, str, str]:
    """(state dict, config overrides, format, sha256 of the file)."""
    raw, recorded = read_checkpoint_file(path, with_config=True)
    try:
        sd, overrides, fmt = convert_checkpoint(raw)
    except PrepError as exc:  # name the file: "checkpoint has no ..." alone does not say which
        raise PrepError(f"{path}: {exc}") from exc
    overrides.update(recorded)  # what train-detector changed beyond what the weights imply
    return sd, overrides, fmt, sha256_file(Path(path))
