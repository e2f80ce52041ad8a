"""show-alignment: an image with, for each word of a caption, the region it aligns to best."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import PrepError


def show_alignment(source: Path, image_key: str, caption: str, out: Path, *, splits: Path | None = None,
                   features: Path | None = None, images: Path | None = None,
                   tokenizer: str | None = None,
                   text_encoder: Path | None = None) -> list[tuple[str, int, float]]:
    """Writes a PNG to `out`; returns [(word piece, region index, cosine)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from ..manifests import FeatureStore
    from ..manifests.atomic import commit_temp, temp_path_for
    from ..manifests.splits import check_lineage, run_caption_rule
    from ..teran.checkpoint import load_model
    from ..teran.visualize import word_region_alignment
    from ..tokenizers import load_wordpiece, normalize_caption

    model, ckpt = load_model(source, text_encoder=text_encoder)
    if features is None:
        if splits is None:
            lineage = ckpt.get("lineage") or {}
            if not lineage.get("splits"):
                raise PrepError(f"{source}: no training splits recorded; pass --splits or --features")
            from ..manifests.remote import localize_folder
            splits = localize_folder(lineage["splits"], "splits")  # a path, or splits at a URL
        features = check_lineage(Path(splits))
    store = FeatureStore(features)
    if image_key not in store:
        raise PrepError(f"{store.root}: no ok regions for {image_key!r}; check the key (path "
                        "relative to the image root, e.g. train2014/x.jpg)")
    regions = store[image_key]
    if tokenizer is None:
        tokenizer = ckpt["config"]["text"]["encoder"]
        # Original TERAN checkpoints name bert-base-uncased, whose vocabulary the bundled MiniLM
        # shares (DESIGN.md): no download needed to tokenize for them.
        if tokenizer == "bert-base-uncased":
            tokenizer = "minilm"
    wp = load_wordpiece(tokenizer)
    wp.backend.no_truncation()
    # as search tokenizes it: by the caption rule of the run's training captions
    encoding = wp.backend.encode(normalize_caption(caption, run_caption_rule(ckpt.get("lineage"), splits)))
    positions = model.text_encoder.config.max_position_embeddings
    if len(encoding.ids) > positions:  # the encoder has no position for the rest: refuse, not crash
        raise PrepError(f"the caption has {len(encoding.ids)} word pieces ([CLS] and [SEP] included), "
                        f"the text encoder of {source} takes at most {positions}; shorten the caption")
    aligned = word_region_alignment(model, regions, list(encoding.ids))
    result = [(encoding.tokens[pos], region, score) for pos, region, score in aligned]

    root = Path(images) if images else Path(store.manifest.get("input", {}).get("root", ""))
    path = root / image_key
    if path.is_file():
        with Image.open(path) as im:
            from PIL import ImageOps
            picture = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        title = image_key
    else:  # features without their images: draw the boxes on a blank canvas of the right size
        picture = np.full((regions.height, regions.width, 3), 200, dtype=np.uint8)
        title = f"{image_key} (image not found under {root})"
    fig, ax = plt.subplots(figsize=(8, 8 * regions.height / max(regions.width, 1)))
    ax.imshow(picture)
    colours = plt.get_cmap("tab10")
    for i, (word, region, score) in enumerate(result):
        x1, y1, x2, y2 = (float(v) for v in regions.boxes[region])
        colour = colours(i % 10)
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2))
        ax.text(x1 + 2, y1 + 2 + 12 * (i % 3), f"{word} {score:.2f}", color="white", fontsize=9,
                va="top", bbox=dict(facecolor=colour, alpha=0.8, pad=1, edgecolor="none"))
    ax.set_title(f"{title}\n{caption}", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(out)
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    commit_temp(tmp, out)
    store.close()
    return result
