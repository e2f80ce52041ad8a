"""make-synthetic: generated shape scenes with COCO boxes (colour as attribute) and Karpathy captions.

A scene is sampled first (pure numpy, from one seeded Generator), then drawn with Pillow without
anti-aliasing, so every object's box is the exact extent of its own pixels. Captions are written
from the scene and always name every object once, as `[size] colour shape`. Colour-shape pairs
recombine freely, and a share of scenes are "binding twins": the same shapes and colours as
another scene in the same split, with the colours swapped between the shapes, so a model that
ignores which colour goes with which shape cannot rank the right image first.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .. import __version__
from ..errors import PrepError
from ..manifests.atomic import atomic_write_bytes, atomic_write_json
from ..manifests.fingerprint import fingerprint
from ..manifests.ownership import releases_locks

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
# Saturated colours far from the grey backgrounds and from one another (pixel tests rely on it).
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "purple": (145, 50, 185),
    "orange": (245, 130, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = {"small": (0.17, 0.23), "large": (0.30, 0.38)}  # object side / image short side
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
BACKGROUNDS = ("plain", "stripes", "checker", "noise")
BACKGROUND_PHRASES = {"plain": "a plain background", "stripes": "a striped background",
                      "checker": "a checkered background", "noise": "a grainy background"}
COUNT_WORDS = ("zero", "one", "two", "three", "four")
OBJECT_COUNT_P = (0.15, 0.35, 0.30, 0.20)  # 1..4 objects: mostly several, so relations matter
COLOUR_JITTER = 12
GAP = 3  # pixels kept free between objects, so a box never holds another object's pixels
SUBDIR_SIZE = 500
SYNTHETIC_FORMAT = "teranprep.synthetic"
SYNTHETIC_FORMAT_VERSION = 1
STAMP_NAME = "synthetic.json"
INSTANCES_NAME = "instances.json"
CAPTIONS_NAME = "dataset_synthetic.json"


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    half: float  # half the side of the square the shape is drawn in
    rgb: tuple[int, int, int]  # nominal colour plus this object's jitter
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # x, y, w, h of its drawn pixels (COCO)

    def describe(self, with_size: bool, size_word: str | None = None) -> str:
        words = ([size_word or self.size] if with_size else []) + [self.colour, self.shape]
        return " ".join(words)


@dataclass
class Scene:
    width: int
    height: int
    background: str
    background_rgb: tuple[tuple[int, int, int], tuple[int, int, int]]
    texture_seed: int
    objects: list[SceneObject] = field(default_factory=list)
    twin_of: int | None = None

    def pairs(self) -> list[tuple[str, str]]:
        return sorted((o.colour, o.shape) for o in self.objects)


# ---------------------------------------------------------------- sampling

def _grey(rng, low, high, tint=10):
    level = int(rng.integers(low, high + 1))
    return tuple(int(np.clip(level + rng.integers(-tint, tint + 1), 0, 255)) for _ in range(3))


def _jitter(rng, rgb):
    return tuple(int(np.clip(c + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255)) for c in rgb)


def _place(rng, scene: Scene, half: float, placed: list[tuple[float, float, float]], tries=200):
    """A centre for a shape of half-side `half` clear of the placed ones, or None."""
    margin = 2
    low_x, high_x = half + margin, scene.width - 1 - half - margin
    low_y, high_y = half + margin, scene.height - 1 - half - margin
    if low_x > high_x or low_y > high_y:
        return None
    for _ in range(tries):
        cx, cy = rng.uniform(low_x, high_x), rng.uniform(low_y, high_y)
        if all(abs(cx - px) > half + ph + GAP or abs(cy - py) > half + ph + GAP
               for px, py, ph in placed):
            return cx, cy
    return None


def _lay_out(rng, scene: Scene, specs: list[tuple[str, str, str]]) -> None:
    """Places (shape, colour, size) objects; a large one that does not fit becomes small, then is dropped."""
    short = min(scene.width, scene.height)
    placed = []
    for shape, colour, size in specs:
        for attempt_size in ((size, "small") if size == "large" else (size,)):
            lo, hi = SIZES[attempt_size]
            half = rng.uniform(lo, hi) * short / 2
            centre = _place(rng, scene, half, placed)
            if centre is not None:
                placed.append((centre[0], centre[1], half))
                scene.objects.append(SceneObject(shape, colour, attempt_size, centre, half,
                                                 _jitter(rng, COLOURS[colour])))
                break


def _background(rng, width, height) -> Scene:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    base = _grey(rng, 80, 200)
    second = _grey(rng, 80, 200) if kind != "plain" else base
    return Scene(width, height, kind, (base, second), int(rng.integers(2**31)))


def sample_scene(rng: np.random.Generator, width: int, height: int) -> Scene:
    scene = _background(rng, width, height)
    n = 1 + int(rng.choice(len(OBJECT_COUNT_P), p=OBJECT_COUNT_P))
    specs = [(SHAPES[int(rng.integers(len(SHAPES)))], COLOUR_NAMES[int(rng.integers(len(COLOURS)))],
              "small" if rng.random() < 0.5 else "large") for _ in range(n)]
    _lay_out(rng, scene, specs)
    return scene


def sample_binding_twin(rng: np.random.Generator, source: Scene, width: int, height: int) -> Scene | None:
    """The source's shapes and colours with the colours moved to other shapes, in a new layout.

    None when no such swap changes the colour-shape pairs (one object, or one colour, or one shape).
    """
    shapes = [o.shape for o in source.objects]
    colours = [o.colour for o in source.objects]
    original = sorted(zip(colours, shapes))
    for _ in range(20):
        order = rng.permutation(len(colours))
        swapped = [colours[i] for i in order]
        if sorted(zip(swapped, shapes)) != original:
            break
    else:
        return None
    scene = _background(rng, width, height)
    specs = [(shape, colour, o.size) for shape, colour, o in zip(shapes, swapped, source.objects)]
    _lay_out(rng, scene, specs)
    if len(scene.objects) != len(specs) or scene.pairs() == source.pairs():
        return None
    return scene


# ---------------------------------------------------------------- drawing

def _shape_mask(obj: SceneObject, width: int, height: int) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = obj.centre
    r = obj.half
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif obj.shape == "square":
        draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=255)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=255)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)], fill=255)
    elif obj.shape == "cross":
        arm = 0.34 * r
        draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=255)
        draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=255)
    elif obj.shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        draw.polygon([(float(cx + q * np.cos(a)), float(cy + q * np.sin(a)))
                      for q, a in zip(radii, angles)], fill=255)
    else:  # pragma: no cover - SHAPES lists every kind drawn above
        raise ValueError(obj.shape)
    return mask


def _background_image(scene: Scene) -> Image.Image:
    w, h = scene.width, scene.height
    base, second = (np.array(c, np.float32) for c in scene.background_rgb)
    yy, xx = np.mgrid[0:h, 0:w]
    texture = np.random.default_rng(scene.texture_seed)
    if scene.background == "plain":
        pixels = np.broadcast_to(base, (h, w, 3)).copy()
    elif scene.background == "stripes":
        period = int(texture.integers(6, 14))
        angle = texture.uniform(0, np.pi)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) // (period / 2)
        pixels = np.where((phase % 2 == 0)[..., None], base, second)
    elif scene.background == "checker":
        cell = int(texture.integers(6, 16))
        pixels = np.where((((xx // cell) + (yy // cell)) % 2 == 0)[..., None], base, second)
    else:  # noise: grain around the base grey
        pixels = base + texture.normal(0, 14, (h, w, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def render_scene(scene: Scene) -> Image.Image:
    """Draws the scene and sets every object's COCO box from the pixels it actually covers."""
    image = _background_image(scene)
    for obj in scene.objects:
        mask = _shape_mask(obj, scene.width, scene.height)
        x1, y1, x2, y2 = mask.getbbox()  # exclusive right/bottom edges
        obj.box = (x1, y1, x2 - x1, y2 - y1)
        image.paste(Image.new("RGB", image.size, obj.rgb), (0, 0), mask)
    return image


# ---------------------------------------------------------------- captions

def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where `a` is relative to `b`, along the axis on which their centres differ most."""
    dx, dy = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _where(obj: SceneObject, scene: Scene) -> str:
    fx, fy = obj.centre[0] / scene.width, obj.centre[1] / scene.height
    vertical = "top" if fy < 0.4 else "bottom" if fy > 0.6 else ""
    horizontal = "left" if fx < 0.4 else "right" if fx > 0.6 else ""
    if vertical and horizontal:
        return f"in the {vertical} {horizontal} corner"
    if vertical or horizontal:
        return f"at the {vertical or horizontal}"
    return "in the middle"


def _shuffled(rng, items: list) -> list:
    return [items[int(k)] for k in rng.permutation(len(items))]


def _captions(rng, scene: Scene, n_captions: int) -> list[str]:
    objs = scene.objects

    def phrase(o):
        with_size = rng.random() < 0.6
        words = SIZE_WORDS[o.size]
        return _article(o.describe(with_size, words[int(rng.integers(len(words)))]))

    def listing(items):
        return _join([phrase(o) for o in items])

    def t_list():
        lead = ("", "there is ", "a picture of ", "an image showing ", "we see ")[int(rng.integers(5))]
        text = lead + listing(_shuffled(rng, objs))
        if lead == "there is " and len(objs) > 1:
            text = "there are " + text[len("there is "):]
        return text

    def t_background():
        return f"{listing(_shuffled(rng, objs))} on {BACKGROUND_PHRASES[scene.background]}"

    def t_count():
        n = len(objs)
        noun = "shape" if n == 1 else "shapes"
        return f"{COUNT_WORDS[n]} {noun}: {listing(_shuffled(rng, objs))}"

    def t_left_to_right():
        if len(objs) == 1:
            return f"{phrase(objs[0])} {_where(objs[0], scene)}"
        ordered = sorted(objs, key=lambda o: o.centre[0])
        return "from left to right, " + listing(ordered)

    def t_relation():
        if len(objs) == 1:
            return f"{_where(objs[0], scene)} there is {phrase(objs[0])}"
        i, j = (int(k) for k in rng.choice(len(objs), size=2, replace=False))
        text = f"{phrase(objs[i])} {relation(objs[i], objs[j])} {phrase(objs[j])}"
        rest = [o for k, o in enumerate(objs) if k not in (i, j)]
        if rest:
            text += (", with " if rng.random() < 0.5 else ", and also ") + listing(rest)
        return text

    def t_chain():
        if len(objs) == 1:
            return f"just {phrase(objs[0])} on {BACKGROUND_PHRASES[scene.background]}"
        order = list(rng.permutation(len(objs)))
        parts = [phrase(objs[order[0]])]
        for prev, cur in zip(order, order[1:]):
            parts.append(f"{relation(objs[prev], objs[cur])} {phrase(objs[cur])}")
        return parts[0] + " " + parts[1] + "".join(f", which is {p}" for p in parts[2:])

    templates = [t_list, t_background, t_count, t_left_to_right, t_relation, t_chain]
    chosen = rng.permutation(len(templates))
    out = []
    for k in range(n_captions):
        out.append(templates[int(chosen[k % len(templates)])]())
    return out


# ---------------------------------------------------------------- the stage

@dataclass
class SyntheticResult:
    out: Path
    n_images: int
    n_objects: int
    n_twins: int
    split_counts: dict
    wall_s: float
    noop: bool = False

    @property
    def images_dir(self) -> Path:
        return self.out / "images"

    @property
    def instances(self) -> Path:
        return self.out / INSTANCES_NAME

    @property
    def captions(self) -> Path:
        return self.out / CAPTIONS_NAME

    def summary(self) -> str:
        head = "make-synthetic: up to date, nothing to do" if self.noop else \
            f"make-synthetic: wrote {self.n_images} images in {self.wall_s:.1f}s"
        splits = ", ".join(f"{k} {v}" for k, v in self.split_counts.items())
        return (f"{head} -> {self.out}\n  {self.n_objects} objects, {self.n_twins} binding twins; "
                f"splits: {splits}\n  images {self.images_dir}, boxes {self.instances}, "
                f"captions {self.captions}")


def _split_groups(rng, groups: list[list[int]], n_val: int, n_test: int) -> dict[int, str]:
    """Whole groups (a scene and its twin) go to one split, so twins confuse each other at test."""
    split_of = {}
    need = {"test": n_test, "val": n_val}
    for g in rng.permutation(len(groups)):
        group = groups[int(g)]
        target = next((s for s in ("test", "val") if need[s] > 0), "train")
        for i in group:
            split_of[i] = target
        if target != "train":
            need[target] -= len(group)
    return split_of


@releases_locks
def make_synthetic(out: Path, *, images: int = 1000, seed: int = 0, size: int = 160,
                   captions_per_image: int = 5, val: int | None = None, test: int | None = None,
                   twin_rate: float = 0.3, image_format: str = "mix", overwrite: bool = False,
                   echo=None) -> SyntheticResult:
    """Writes `images` scenes under out/images/, out/instances.json (COCO) and the captions JSON.

    Deterministic for a seed: the scenes, boxes, captions and splits depend only on the
    parameters (PNG pixels too; JPEG bytes depend on the installed libjpeg). A finished run with
    the same parameters is a no-op; other parameters into the same `out` need `overwrite`.
    """
    t0 = time.perf_counter()
    out = Path(out)
    say = echo or (lambda message: None)
    val = max(1, round(0.1 * images)) if val is None else val
    test = max(1, round(0.1 * images)) if test is None else test
    checks = [(images >= 1, "--images must be >= 1"), (size >= 48, "--size must be >= 48 pixels"),
              (captions_per_image >= 1, "--captions-per-image must be >= 1"),
              (val >= 0 and test >= 0 and val + test < images,
               "--val and --test must be >= 0 and leave at least one training image"),
              (0 <= twin_rate <= 1, "--twin-rate must be within [0, 1]"),
              (image_format in ("mix", "png", "jpeg"), "--image-format must be mix, png or jpeg")]
    for ok, message in checks:
        if not ok:
            raise PrepError(message)
    params = {"images": images, "seed": seed, "size": size, "captions_per_image": captions_per_image,
              "val": val, "test": test, "twin_rate": twin_rate, "image_format": image_format,
              "generator_version": SYNTHETIC_FORMAT_VERSION}
    params_fp = fingerprint(params)
    from ..manifests.ownership import SYNTHETIC, claim_output_dir
    claim_output_dir(out, SYNTHETIC)
    stamp_path = out / STAMP_NAME
    if stamp_path.is_file():
        try:
            stamp = json.loads(stamp_path.read_text("utf-8"))
        except ValueError:
            stamp = {}
        if stamp.get("parameters_fingerprint") == params_fp and not overwrite:
            counts = stamp["counts"]
            return SyntheticResult(out, counts["images"], counts["objects"], counts["twins"],
                                   counts["splits"], time.perf_counter() - t0, noop=True)
        if not overwrite:
            raise PrepError(f"{out}: holds a synthetic set made with other parameters "
                            f"({stamp_path}); use another OUT or pass --overwrite")
    if overwrite:
        for name in (STAMP_NAME, INSTANCES_NAME, CAPTIONS_NAME):
            (out / name).unlink(missing_ok=True)
        if (out / "images").is_dir():
            shutil.rmtree(out / "images")
    elif (out / "images").exists() and any((out / "images").iterdir()):
        raise PrepError(f"{out / 'images'}: already has files but no {STAMP_NAME}; use an empty "
                        "OUT or pass --overwrite")

    rng = np.random.default_rng(seed)
    scenes: list[Scene] = []
    groups: list[list[int]] = []
    while len(scenes) < images:
        w = int(size * rng.uniform(1.0, 1.3)) // 8 * 8
        scene = sample_scene(rng, w, size)
        scenes.append(scene)
        groups.append([len(scenes) - 1])
        if len(scenes) < images and rng.random() < twin_rate:
            twin = sample_binding_twin(rng, scene, int(size * rng.uniform(1.0, 1.3)) // 8 * 8, size)
            if twin is not None:
                twin.twin_of = len(scenes) - 1
                scenes.append(twin)
                groups[-1].append(len(scenes) - 1)
    split_of = _split_groups(rng, groups, val, test)

    coco_images, annotations, karpathy = [], [], []
    colour_ids = {c: i + 1 for i, c in enumerate(COLOUR_NAMES)}
    shape_ids = {s: i + 1 for i, s in enumerate(SHAPES)}
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        picture = render_scene(scene)
        use_jpeg = image_format == "jpeg" or (image_format == "mix" and rng.random() < 0.5)
        subdir = f"part-{i // SUBDIR_SIZE:03d}"
        filename = f"syn-{i:06d}.{'jpg' if use_jpeg else 'png'}"
        buffer = io.BytesIO()
        if use_jpeg:
            picture.save(buffer, "JPEG", quality=92)
        else:
            picture.save(buffer, "PNG")
        (out / "images" / subdir).mkdir(exist_ok=True)
        atomic_write_bytes(out / "images" / subdir / filename, buffer.getvalue())
        key = f"{subdir}/{filename}"
        coco_images.append({"id": i + 1, "file_name": key, "width": scene.width,
                            "height": scene.height, "split": split_of[i],
                            "background": scene.background})
        for obj in scene.objects:
            x, y, w, h = obj.box
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": shape_ids[obj.shape], "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0,
                                "attribute_ids": [colour_ids[obj.colour]], "size": obj.size})
        captions = _captions(rng, scene, captions_per_image)
        karpathy.append({"imgid": i, "filepath": subdir, "filename": filename, "split": split_of[i],
                         "twin_of": scene.twin_of,
                         "sentences": [{"raw": c, "tokens": c.replace(",", " ,").replace(":", " :").split(),
                                        "imgid": i, "sentid": i * captions_per_image + k}
                                       for k, c in enumerate(captions)]})
        if echo and (i + 1) % 500 == 0:
            say(f"  {i + 1}/{len(scenes)} images")
    instances = {
        "info": {"description": "teranprep synthetic shapes", "version": __version__,
                 "parameters": params},
        "images": coco_images, "annotations": annotations,
        "categories": [{"id": shape_ids[s], "name": s, "supercategory": "shape"} for s in SHAPES],
        "attributes": [{"id": colour_ids[c], "name": c} for c in COLOUR_NAMES],
    }
    atomic_write_json(out / INSTANCES_NAME, instances)
    atomic_write_json(out / CAPTIONS_NAME, {"dataset": "synthetic", "images": karpathy})
    counts = {"images": len(scenes), "objects": len(annotations),
              "twins": sum(s.twin_of is not None for s in scenes),
              "splits": {s: sum(v == s for v in split_of.values()) for s in ("train", "val", "test")}}
    atomic_write_json(stamp_path, {"format": SYNTHETIC_FORMAT, "format_version": SYNTHETIC_FORMAT_VERSION,
                                   "parameters": params, "parameters_fingerprint": params_fp,
                                   "counts": counts, "teranprep_version": __version__})
    return SyntheticResult(out, counts["images"], counts["objects"], counts["twins"],
                           counts["splits"], time.perf_counter() - t0)
