"""The embedded "scenes" dataset, written in every file format of the reference release.

Each image holds a few coloured shapes side by side. Scenes come in groups of hard negatives,
in one of two regimes (``regime``):

- ``binding``: captions state which attribute goes with which shape and where ("a red circle
  left of a blue square"); a group's images have the same shapes and colours bound differently,
  so a bag of words cannot tell them apart and entity binding matters.
- ``neglect``: one large *primary* object and small *secondary* ones; captions name every object
  ("a red circle with a blue square and a green cross"); a group's images share the primary object
  and differ in their secondary ones, the objects a model pretrained on salient-object alt-text
  neglects (``agree.data.alt_text``).

Each split, and the Visual Genome-style bank, has its own random stream, so the test split does
not depend on the training-set size and a smaller training set is a prefix of a larger one.
Everything is deterministic per seed.

    python -m agree.data.synthetic root=OUT_DIR [seed=0 image_size=64 ...]    (--help: every key)
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from omegaconf import MISSING
from PIL import Image, ImageDraw

from agree.atomic import write_json, write_jsonl, write_npz
from agree.cli import run_command
from agree.data.layout import ReleaseLayout
from agree.data.pixels import OPENAI_MEAN, OPENAI_STD, normalise
from agree.errors import ConfigError
from agree.folders import check_claim, claim
from agree.progress import progress

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.55, "large": 1.0}
REGIMES = ("binding", "neglect")
MANIFEST = "synthetic.json"  # written last: the folder holds a complete dataset
OWNER = "scenes"  # the generator's mark on its folders (agree.folders)
PHRASINGS = 7  # the captions() templates: a scene has at most this many captions


@dataclass(frozen=True)
class SceneConfig:
    """Size and difficulty of the generated dataset."""

    seed: int = 0
    regime: str = "binding"  # binding | neglect (see the module's docstring)
    image_size: int = 64
    train_images: int = 1200
    val_images: int = 100
    test_images: int = 200
    captions_per_image: int = 5
    min_objects: int = 2
    max_objects: int = 3
    attributes: int = 1  # 1: colour; 2: colour and size
    binding_variants: int = 3  # images per group of hard negatives (bound, or with other secondaries)
    vg_images_per_word: int = 6
    noise: float = 0.04  # pixel noise, as a fraction of the range
    mean: tuple[float, ...] = OPENAI_MEAN  # normalisation of the npz images: the model's
    std: tuple[float, ...] = OPENAI_STD

    @property
    def train_captions(self) -> int:
        """The training records (one per caption) the dataset holds."""
        return self.train_images * min(self.captions_per_image, PHRASINGS)

    def params(self) -> dict:
        """The parameters as JSON values (what the manifest records)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def layout(self, out_dir: str | Path) -> ReleaseLayout:
        """The release layout of a dataset generated with these parameters under ``out_dir``."""
        return ReleaseLayout(
            Path(out_dir), Path(out_dir) / "VG", self.image_size, mean=self.mean, std=self.std
        )


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    column: int  # left-to-right slot
    y: float  # vertical centre, fraction of the height

    def phrase(self, attributes: int) -> str:
        words = " ".join(([self.size] if attributes > 1 else []) + [self.color, self.shape])
        return ("an " if words[0] in "aeiou" else "a ") + words


# ---------------------------------------------------------------------------------------------
# scenes


def _group(rng: random.Random, cfg: SceneConfig) -> list[list[SceneObject]]:
    """A binding group: the same shapes and colours in ``binding_variants`` different bindings."""
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    shapes = rng.sample(SHAPES, n)
    colors = rng.sample(list(COLORS), n)
    sizes = [rng.choice(list(SIZES)) if cfg.attributes > 1 else "large" for _ in range(n)]
    scenes, seen = [], set()
    for _ in range(cfg.binding_variants * 10):
        if len(scenes) == cfg.binding_variants:
            break
        order = rng.sample(range(n), n)  # which colour goes with which shape
        columns = rng.sample(range(cfg.max_objects), n)
        key = (tuple(order), tuple(sorted(range(n), key=lambda i: columns[i])))
        if key in seen:
            continue
        seen.add(key)
        scenes.append(
            [
                SceneObject(shapes[i], colors[order[i]], sizes[order[i]], columns[i], rng.uniform(0.3, 0.7))
                for i in range(n)
            ]
        )
    return scenes


def secondaries(
    rng: random.Random, primary: SceneObject, columns: list[int], shapes: list[str], colors: list[str]
) -> list[SceneObject]:
    """Small objects at ``columns``, of distinct shapes and colours none of which is the primary's."""
    shapes = rng.sample([s for s in shapes if s != primary.shape], len(columns))
    colors = rng.sample([c for c in colors if c != primary.color], len(columns))
    return [
        SceneObject(shape, color, "small", col, rng.uniform(0.3, 0.7))
        for shape, color, col in zip(shapes, colors, columns, strict=True)
    ]


def salient_scene(rng: random.Random, secondary_count: int, columns: int) -> list[SceneObject]:
    """A large primary object (first) and ``secondary_count`` small ones, each in its own column."""
    where = rng.sample(range(columns), secondary_count + 1)
    primary = SceneObject(
        rng.choice(SHAPES), rng.choice(list(COLORS)), "large", where[0], rng.uniform(0.3, 0.7)
    )
    return [primary, *secondaries(rng, primary, where[1:], list(SHAPES), list(COLORS))]


def _neglect_group(rng: random.Random, cfg: SceneConfig) -> list[list[SceneObject]]:
    """A group sharing its primary object (and every place) whose secondary objects differ."""
    base = salient_scene(rng, rng.randint(cfg.min_objects, cfg.max_objects) - 1, cfg.max_objects)
    primary, places = base[0], [(o.column, o.y) for o in base[1:]]
    scenes, seen = [], set()
    for _ in range(cfg.binding_variants * 10):
        if len(scenes) == cfg.binding_variants:
            break
        others = secondaries(rng, primary, [c for c, _ in places], list(SHAPES), list(COLORS))
        others = [replace(o, y=y) for o, (_, y) in zip(others, places, strict=True)]
        key = tuple((o.shape, o.color) for o in others)
        if key not in seen:
            seen.add(key)
            scenes.append([primary, *others])
    return scenes


def _scenes(rng: random.Random, cfg: SceneConfig, count: int) -> list[list[SceneObject]]:
    group = {"binding": _group, "neglect": _neglect_group}[cfg.regime]
    out: list[list[SceneObject]] = []
    while len(out) < count:
        out.extend(group(rng, cfg))
    return out[:count]


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, box: tuple[float, float, float, float]) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(box, fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:  # cross
        t = r / 3
        draw.rectangle((cx - t, y0, cx + t, y1), fill=fill)
        draw.rectangle((x0, cy - t, x1, cy + t), fill=fill)


def object_box(obj: SceneObject, image_size: int, columns: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), inclusive-exclusive, of an object."""
    cell = image_size / columns
    half = 0.42 * cell * SIZES[obj.size]
    cx, cy = (obj.column + 0.5) * cell, obj.y * image_size
    return (round(cx - half), round(cy - half), round(cx + half), round(cy + half))


def render(
    objects: list[SceneObject], image_size: int, columns: int, rng: np.random.Generator, noise: float
) -> np.ndarray:
    """RGB uint8 image (H×W×3) of a scene on a grey, noisy background."""
    image = Image.new("RGB", (image_size, image_size), (110, 110, 110))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x0, y0, x1, y1 = object_box(obj, image_size, columns)
        _draw_shape(draw, obj, (x0, y0, x1 - 1, y1 - 1))
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0.0, 255 * noise, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# captions


def captions(
    objects: list[SceneObject], attributes: int, rng: random.Random, count: int
) -> list[tuple[str, list[str]]]:
    """``count`` distinct phrasings of a scene, each with the entity phrases it mentions."""
    ordered = sorted(objects, key=lambda o: o.column)
    p = [o.phrase(attributes) for o in ordered]
    a, b, rest = p[0], p[-1], p[1:-1]
    middle = f" with {rest[0]} between them" if rest else ""
    templates = [
        (f"{a} left of {b}{middle}", [a, b, *rest]),
        (f"{b} to the right of {a}{middle}", [b, a, *rest]),
        (f"{a} on the left and {b} on the right{middle}", [a, b, *rest]),
        ("from left to right: " + ", ".join(p[:-1]) + f" and {p[-1]}", p),
        ("from right to left: " + ", ".join(p[::-1][:-1]) + f" and {p[0]}", p[::-1]),
        (f"on the left is {a}, on the right is {b}{middle}", [a, b, *rest]),
        (f"{a} and {b}" + "".join(f" and {r}" for r in rest), p),
    ]
    chosen = rng.sample(templates, min(count, PHRASINGS))
    out = []
    for text, entities in chosen:
        longest = f"{a} left of {b}"
        segs = entities + ([longest] if longest in text else [])
        out.append((text, segs))
    return out


def neglect_captions(
    objects: list[SceneObject], attributes: int, rng: random.Random, count: int
) -> list[tuple[str, list[str]]]:
    """``count`` distinct captions naming every object, primary (``objects[0]``) and secondary ones."""
    p, *s = [o.phrase(attributes) for o in objects]
    rest = " and ".join(s)
    listed = ", ".join([p, *s[:-1]]) + f" and {s[-1]}"
    templates = [
        (f"{p} with {rest}", [p, *s]),
        (f"{p} next to {rest}", [p, *s]),
        (f"{rest} beside {p}", [*s, p]),
        (listed, [p, *s]),
        (f"a picture of {p} and {rest}", [p, *s]),
        (f"{rest} and {p}", [*s, p]),
        (f"{p} together with {rest}", [p, *s]),
    ]
    return rng.sample(templates, min(count, len(templates)))


def entity_word(obj: SceneObject, regime: str) -> str:
    """The object's word in the image object lists and the Visual Genome bank: the shape (binding)
    or colour and shape (neglect, whose bank covers every shape and colour)."""
    return obj.shape if regime == "binding" else f"{obj.color} {obj.shape}"


# ---------------------------------------------------------------------------------------------
# writing the release


def _flickr_id(split: str, index: int) -> int:
    return {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}[split] + index


def contents(layout: ReleaseLayout) -> list[str]:
    """The files the generator writes under ``layout.root`` (relative), which make clean may delete."""
    files = [layout.train_records, layout.val_records, layout.test_texts, layout.test_images]
    files += [layout.test_text_segs, layout.grounding_npz, layout.root / MANIFEST]
    files += [layout.vg_images_npz, layout.vg_mask_images_npz, layout.vg_vocab]
    for split in ("train", "val", "test"):
        files += [layout.images_npz(split), layout.image_objects(split)]
    return sorted(path.relative_to(layout.root).as_posix() for path in files)


def generate(out_dir: str | Path, cfg: SceneConfig = SceneConfig()) -> ReleaseLayout:
    """Write the whole release layout under ``out_dir`` (Visual Genome under ``out_dir/VG``).

    ``out_dir`` must be missing, empty, or a scenes folder of the same parameters (``claim``).
    """
    if cfg.regime not in REGIMES:
        raise ConfigError(f"regime={cfg.regime}: choose one of {', '.join(REGIMES)}")
    claim(out_dir, OWNER, cfg.params(), contents(cfg.layout(out_dir)))
    layout = cfg.layout(out_dir)
    columns = cfg.max_objects
    write_captions = {"binding": captions, "neglect": neglect_captions}[cfg.regime]
    grounding: dict[str, np.ndarray] = {}
    splits = {"train": cfg.train_images, "val": cfg.val_images, "test": cfg.test_images}
    for number, (split, count) in enumerate(splits.items()):
        rng = random.Random(f"{cfg.seed}-{split}-text")  # each split its own streams, scenes apart
        scenes = _scenes(random.Random(f"{cfg.seed}-{split}"), cfg, count)
        noise_rng = np.random.default_rng([cfg.seed, number])
        images: dict[str, np.ndarray] = {}
        train_rows, val_rows, text_rows, image_rows, seg_rows, object_rows = [], [], [], [], [], []
        for index, scene in enumerate(progress(scenes, f"scenes: {split}", count)):
            fid = _flickr_id(split, index)
            path = f"flickr30k-images/{fid}.jpg"
            pixels = render(scene, cfg.image_size, columns, noise_rng, cfg.noise)
            key = {"train": str(index), "val": str(index), "test": str(fid)}[split]
            images[key] = normalise(pixels, mean=cfg.mean, std=cfg.std)
            words = sorted({entity_word(o, cfg.regime) for o in scene})
            object_rows.append({"image_id": fid, "image_objects": words})
            caps = write_captions(scene, cfg.attributes, rng, cfg.captions_per_image)
            by_phrase = {o.phrase(cfg.attributes): o for o in scene}
            if split == "train":
                for phrase, obj in by_phrase.items():
                    box = object_box(obj, cfg.image_size, columns)
                    grounding[f"{fid}_{phrase}"] = normalise(pixels, blank=box, mean=cfg.mean, std=cfg.std)
                for text, segs in caps:
                    preds = [{seg: round(rng.uniform(0.5, 0.95), 3)} for seg in segs if seg in by_phrase]
                    if rng.random() < 0.3:  # the grounding model's "no specific label" entries
                        preds.insert(
                            rng.randrange(len(preds) + 1), {"object": round(rng.uniform(0.3, 0.6), 3)}
                        )
                    train_rows.append(
                        {"image": path, "caption": text, "image_id": index, "segs": segs, "preds": preds}
                    )
            elif split == "val":
                val_rows.append({"image": path, "caption": [text for text, _ in caps]})
            else:
                query_ids = []
                for text, segs in caps:
                    qid = len(text_rows)
                    query_ids.append(qid)
                    text_rows.append({"query_id": qid, "query_text": text, "item_ids": [fid]})
                    seg_rows.append({"query_id": qid, "query_text": text, "items": segs})
                image_rows.append({"image_id": fid, "item_ids": query_ids})
        write_npz(layout.images_npz(split), images)
        write_jsonl(layout.image_objects(split), object_rows)
        if split == "train":
            write_jsonl(layout.train_records, train_rows)
        elif split == "val":
            write_json(layout.val_records, val_rows)
        else:
            write_jsonl(layout.test_texts, text_rows)
            write_jsonl(layout.test_images, image_rows)
            write_jsonl(layout.test_text_segs, seg_rows)
    write_npz(layout.grounding_npz, grounding)
    _write_visual_genome(layout, cfg, random.Random(f"{cfg.seed}-vg"), np.random.default_rng([cfg.seed, 3]))
    write_json(layout.root / MANIFEST, cfg.params())
    return layout


def _write_visual_genome(
    layout: ReleaseLayout, cfg: SceneConfig, rng: random.Random, noise_rng: np.random.Generator
) -> None:
    """An entity bank: per entity word (``entity_word``), images with that entity and a distractor,
    and the same with its region blanked. Binding: a large shape of any colour beside a small one;
    neglect: the coloured shape at either size, the distractor at the other."""
    images, masked, vocab = {}, {}, []
    vg_id = 1
    words = SHAPES if cfg.regime == "binding" else [f"{c} {s}" for s in SHAPES for c in COLORS]
    for word in words:
        objects = []
        for _ in range(cfg.vg_images_per_word):
            target_col, other_col = rng.sample(range(2), 2)
            sizes = ["large", "small"] if cfg.regime == "binding" else rng.sample(list(SIZES), 2)
            if cfg.regime == "binding":
                target = SceneObject(
                    word, rng.choice(list(COLORS)), sizes[0], target_col, rng.uniform(0.3, 0.7)
                )
            else:
                color, shape = word.split()
                target = SceneObject(shape, color, sizes[0], target_col, rng.uniform(0.3, 0.7))
            other = secondaries(rng, target, [other_col], list(SHAPES), list(COLORS))[0]
            scene = [target, replace(other, size=sizes[1])]
            pixels = render(scene, cfg.image_size, 2, noise_rng, cfg.noise)
            x0, y0, x1, y1 = box = object_box(scene[0], cfg.image_size, 2)
            images[str(vg_id)] = normalise(pixels, mean=cfg.mean, std=cfg.std)
            masked[f"{word}_{vg_id}"] = normalise(pixels, blank=box, mean=cfg.mean, std=cfg.std)
            region = {"object_id": vg_id * 10, "x": x0, "y": y0, "w": x1 - x0, "h": y1 - y0, "names": [word]}
            objects.append({"image_id": vg_id, "object": region})
            vg_id += 1
        vocab.append({"vocab": word, "objects": objects})
    write_npz(layout.vg_images_npz, images)
    write_npz(layout.vg_mask_images_npz, masked)
    write_jsonl(layout.vg_vocab, vocab)


def ensure_generated(out_dir: str | Path, cfg: SceneConfig) -> ReleaseLayout:
    """Generate the dataset unless ``out_dir`` already holds it, complete, for the same parameters.

    Any other non-empty folder (a user's data, a scenes folder of other parameters) is refused
    with a one-line :class:`FolderNotOwnedError`, before anything is written.
    """
    if check_claim(out_dir, OWNER, cfg.params()) and (Path(out_dir) / MANIFEST).is_file():
        layout = cfg.layout(out_dir)
        claim(out_dir, OWNER, cfg.params(), contents(layout))  # a marker of an earlier version gets them
        return layout
    return generate(out_dir, cfg)


@dataclass(frozen=True)
class GenerateConfig(SceneConfig):
    """Write the embedded scenes dataset under root: a new, empty or scenes folder of the same keys."""

    root: str = MISSING  # the folder to write (the keys below are SceneConfig's)

    def scenes(self) -> SceneConfig:
        """The dataset's parameters, without ``root`` (lists, as the command line gives them, as tuples)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(SceneConfig)}
        return SceneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _generate(cfg: GenerateConfig) -> None:
    generate(cfg.root, cfg.scenes())
    print(f"wrote the scenes dataset to {cfg.root}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """``python -m agree.data.synthetic root=DIR key=value ...``; ``--help`` lists the keys."""
    run_command("python -m agree.data.synthetic", GenerateConfig, _generate, argv)


if __name__ == "__main__":
    main()
