"""Data preparation from raw inputs: Karpathy JSON + JPEGs, VG objects.json + JPEGs, shards, CLI.

Raw inputs are built here from the real samples in /work/shared/data (skipped when absent).
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
from PIL import Image

from agree.atomic import write_jsonl
from agree.data import layout, records
from agree.data.npz_images import NpzImages
from agree.data.pixels import CLIP_MEAN, CLIP_STD
from agree.errors import ConfigError, DataFormatError
from agree.prepare import karpathy as karpathy_step
from agree.prepare import visual_genome as vg_step
from agree.prepare.__main__ import main, parse
from agree.prepare.images import Preprocess
from agree.prepare.shards import ShardResult, Shards

from .conftest import SHARED_DATA, shared_data

ENTITIES_8 = SHARED_DATA / "flickr30k_entities_8_images"
VG_SAMPLES = SHARED_DATA / "visual_genome_samples"
TINY = ["model=agree-tiny", "pretrained=null"]  # 64 px, no weights
BLACK = (0 - CLIP_MEAN) / CLIP_STD


def entities_captions(sentences_file) -> list[str]:
    """Plain captions of a Flickr30k Entities Sentences file ("[/EN#1/people A man] ..." -> "A man ...")."""
    lines = sentences_file.read_text().splitlines()
    return [re.sub(r"\[/EN#\d+/\S+ ([^\]]*)\]", r"\1", line).strip() for line in lines if line.strip()]


def flickr_raw(folder, splits=("train",) * 4 + ("val",) * 2 + ("test",) * 2) -> tuple:
    """A Karpathy-split JSON over the 8 real Flickr30k JPEGs: (json path, image folder)."""
    shared_data(ENTITIES_8)
    images = folder / "flickr30k-images"
    images.mkdir(parents=True)
    entries = []
    for split, jpg in zip(splits, sorted((ENTITIES_8 / "images").glob("*.jpg")), strict=False):
        shutil.copy(jpg, images / jpg.name)
        sentences = [
            {"raw": c, "tokens": c.lower().split()}
            for c in entities_captions(ENTITIES_8 / "Sentences" / f"{jpg.stem}.txt")
        ]
        entries.append({"filename": jpg.name, "split": split, "sentences": sentences, "imgid": len(entries)})
    path = folder / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return path, images


def vg_raw(folder, image_ids) -> tuple:
    """VG objects.json (the real sample, cut to ``image_ids``) and JPEGs of the real sizes."""
    shared_data(VG_SAMPLES)
    objects = [
        o
        for o in json.loads((VG_SAMPLES / "objects.json_samples.json").read_text())
        if o["image_id"] in image_ids
    ]
    sizes = {
        m["image_id"]: (m["width"], m["height"])
        for m in json.loads((VG_SAMPLES / "image_data.json_samples.json").read_text())
    }
    images = folder / "VG_100K"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in image_ids:
        w, h = sizes[i]
        Image.fromarray(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h)).save(
            images / f"{i}.jpg"
        )
    path = folder / "objects.json"
    path.write_text(json.dumps(objects))
    return path, folder


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    """The 8 real images through ``karpathy`` (agree-tiny preprocessing, 64 px)."""
    folder = tmp_path_factory.mktemp("flickr")
    source, images = flickr_raw(folder)
    assert (
        main(
            [
                "karpathy",
                f"karpathy={source}",
                f"images={images}",
                f"root={folder / 'release'}",
                "shard_size=3",
                *TINY,
            ]
        )
        == 0
    )
    return layout.ReleaseLayout(folder / "release", folder / "VG", 64), source, images


def test_karpathy_writes_every_reference_file(flickr):
    layout, source, images = flickr
    train = records.read_train_records(layout.train_records)
    assert len(train) == 20 and {r.image_key for r in train} == {"0", "1", "2", "3"}
    assert train[0].flickr_id == "134206" and train[0].caption.startswith("The players of the baseball team")
    assert (
        json.loads(layout.train_records.read_text().splitlines()[0])["image"] == "flickr30k-images/134206.jpg"
    )
    val = records.read_val_records(layout.val_records)
    assert [v.image_key for v in val] == ["0", "1"] and all(len(v.captions) == 5 for v in val)
    texts, tests = records.read_test_texts(layout.test_texts), records.read_test_images(layout.test_images)
    assert [t.query_id for t in texts] == [str(i) for i in range(10)]
    assert [t.image_id for t in tests] == ["65567", "81641"] and tests[1].query_ids == tuple(
        str(i) for i in range(5, 10)
    )
    assert json.loads(layout.test_images.read_text().splitlines()[0])["image_id"] == 65567  # an integer
    for split, keys in (("train", ["0", "1", "2", "3"]), ("val", ["0", "1"]), ("test", ["65567", "81641"])):
        npz = NpzImages(layout.images_npz(split), 64)
        npz.require(keys, f"{split} key")
        assert len(npz) == len(keys)
    # exactly open_clip's own evaluation preprocessing of the model
    _, _, preprocess = open_clip.create_model_and_transforms("agree-tiny", pretrained=None)
    expected = preprocess(Image.open(images / "81641.jpg")).numpy()
    np.testing.assert_allclose(NpzImages(layout.images_npz("test"), 64)["81641"], expected, atol=1e-6)
    assert not list(layout.root.rglob("*.parts"))  # shards merged and removed


def test_coco_restval_joins_train_by_flag_and_test_keys_are_stems(tmp_path):
    shared_data(ENTITIES_8)
    jpgs = sorted((ENTITIES_8 / "images").glob("*.jpg"))[:4]
    entries = []
    for (split, folder), jpg in zip(
        [("train", "train2014"), ("restval", "val2014"), ("val", "val2014"), ("test", "val2014")],
        jpgs,
        strict=True,
    ):
        name = f"COCO_{folder}_{int(jpg.stem):012d}.jpg"
        (tmp_path / "coco" / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(jpg, tmp_path / "coco" / folder / name)
        entries.append(
            {"filepath": folder, "filename": name, "split": split, "sentences": [{"raw": f"a photo {split}"}]}
        )
    source = tmp_path / "dataset_coco.json"
    source.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    for restval, train_images in ((False, 1), (True, 2)):
        root = tmp_path / f"restval-{restval}"
        cfg = karpathy_step.Config(
            karpathy=str(source),
            images=str(tmp_path / "coco"),
            root=str(root),
            restval=restval,
            model="agree-tiny",
            pretrained=None,
        )
        layout = karpathy_step.run(cfg)
        assert layout.prefix == "coco" and layout.train_records.name == "coco_train_pred.jsonl"
        assert len(records.read_train_records(layout.train_records)) == train_images
    (test,) = records.read_test_images(layout.test_images)
    stem = f"COCO_val2014_{int(jpgs[3].stem):012d}"
    assert test.image_id == stem and stem in NpzImages(layout.images_npz("test"), 64)
    assert (
        json.loads(layout.val_records.read_text())[0]["image"]
        == f"coco/val2014/COCO_val2014_{int(jpgs[2].stem):012d}.jpg"
    )


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda d: d["images"][1].pop("split"), ["images[1]", "missing key 'split'"]),
        (lambda d: d["images"][2].update(split="dev"), ["images[2]", "'dev' is not one of"]),
        (lambda d: d["images"][0]["sentences"].append({"tokens": []}), ["images[0].sentences[5]", "'raw'"]),
        (
            lambda d: d["images"][3].update(filename="nope.jpg"),
            ["nope.jpg: image not found", "1 of 8 images"],
        ),
        (lambda d: [i.update(split="train") for i in d["images"]], ["no 'val' images"]),
    ],
)
def test_karpathy_bad_input_names_file_and_element(tmp_path, edit, fragments):
    source, images = flickr_raw(tmp_path)
    data = json.loads(source.read_text())
    edit(data)
    source.write_text(json.dumps(data))
    cfg = karpathy_step.Config(
        karpathy=str(source),
        images=str(images),
        root=str(tmp_path / "out"),
        model="agree-tiny",
        pretrained=None,
    )
    with pytest.raises(DataFormatError) as excinfo:
        karpathy_step.run(cfg)
    message = str(excinfo.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are valid


@pytest.mark.parametrize(
    "argv, fragments",
    [
        ([], ["usage: python -m agree.prepare <step>", "karpathy, entities, ground, visual-genome"]),
        (["karpathi"], ["unknown step 'karpathi'"]),
        (["karpathy", "root=x", "colour=red"], ["unknown key 'colour'", "karpathy=???", "restval=false"]),
        (["karpathy", "root"], ["'root' is not key=value"]),
        (["karpathy", "root=x"], ["missing required images, karpathy"]),
        (["entities", "input=x", "shard_size=many"], ["shard_size", "many"]),
        (
            ["ground", "root=x", "images=y", "model=ViT-Nope"],
            ["model=ViT-Nope is not an open_clip architecture"],
        ),
    ],
)
def test_cli_errors_say_what_is_valid(argv, fragments, capsys):
    assert main(argv) == 1
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and all(f in message for f in fragments), message


def test_cli_config_types():
    module, cfg = parse(
        ["visual-genome", "objects=o.json", "images=i", "root=r", "images_per_word=3", "pretrained=null"]
    )
    assert module is vg_step and cfg.images_per_word == 3 and cfg.pretrained is None and cfg.vg_root is None


def test_preprocessing_of_other_backbones_without_weights():
    siglip = Preprocess.for_model("ViT-B-16-SigLIP", "webli", image_size=96)
    assert siglip.size == 96 and siglip.mean == (0.5, 0.5, 0.5)
    assert Preprocess.for_model("ViT-L-14-quickgelu", "openai").size == 224
    with pytest.raises(ConfigError, match="neither a file nor a pretrained tag of"):
        Preprocess.for_model("ViT-B-32", "no-such-tag")


def test_box_follows_resize_and_centre_crop():
    pre = Preprocess.for_model("agree-tiny")  # shortest side to 64, centre crop
    image = Image.new("RGB", (200, 100), (200, 200, 200))  # -> 128 x 64, crop x from 32
    assert pre.map_box(image.size, (100, 0, 150, 50)) == (32, 0, 64, 32)
    assert pre.map_box(image.size, (0, 0, 40, 100)) is None  # cropped away
    assert pre.map_box(image.size, (190, 10, 260, 20)) is None  # outside the cropped part, clipped
    masked = pre.array(pre.pixels(image), (32, 0, 64, 32))
    assert np.allclose(masked[:, :32, 32:64], BLACK[:, None, None])
    assert np.allclose(masked[:, 32:, :], pre.array(pre.pixels(image))[:, 32:, :])


def double(items):
    return ShardResult(
        rows=[{"x": 2 * i} for i in items], arrays={"a": {str(i): np.full(3, i, np.float32) for i in items}}
    )


class Interrupt(Exception):
    pass


def test_shards_resume_after_an_interruption_and_merge(tmp_path):
    output, calls = tmp_path / "out.npz", []

    def counting(items):
        calls.append(list(items))
        if len(calls) == 3:
            raise Interrupt
        return double(items)

    shards = Shards(output, list(range(10)), 3, {"p": 1})
    with pytest.raises(Interrupt):
        shards.run(counting, "test", "item")
    assert sorted(p.name for p in shards.parts.glob("shard-*")) == [
        "shard-00000.a.npz",
        "shard-00000.jsonl",
        "shard-00001.a.npz",
        "shard-00001.jsonl",
    ]
    calls.clear()
    shards = Shards(output, list(range(10)), 3, {"p": 1})
    shards.run(counting, "test", "item")
    assert calls == [[6, 7, 8], [9]]  # finished shards skipped
    assert [r["x"] for r in shards.rows()] == [2 * i for i in range(10)]
    assert shards.merge_npz("a", output) == 10
    with np.load(output) as merged:
        assert sorted(merged.files, key=int) == [str(i) for i in range(10)] and merged["7"].tolist() == [
            7,
            7,
            7,
        ]
    restarted = []
    Shards(output, list(range(10)), 3, {"p": 2}).run(
        lambda items: restarted.append(items) or double(items), "", ""
    )
    assert len(restarted) == 4  # other settings: started over


def test_visual_genome_bank_and_object_lists(flickr, tmp_path):
    layout, _, _ = flickr
    root = tmp_path / "release"
    shutil.copytree(layout.root, root)
    segs = {
        "134206": ["the players", "a tall building", "a street light"],
        "148284": ["a man", "a yellow shirt", "an information booth"],
    }
    rows = [json.loads(line) for line in layout.train_records.read_text().splitlines()]
    write_jsonl(
        root / "annotation/flickr30k_train_pred.jsonl",
        [{**r, "segs": segs.get(Path(r["image"]).stem, ["the sky"])} for r in rows],
    )
    write_jsonl(
        root / "annotation/flickr30k_test_texts_segs.jsonl",
        [{"query_id": q, "query_text": "", "items": ["two men"]} for q in range(10)],
    )
    objects, images = vg_raw(tmp_path / "vg", image_ids=[1, 2, 3, 4, 5, 6, 7, 8])
    vg_root = tmp_path / "VG"
    argv = [
        "visual-genome",
        f"objects={objects}",
        f"images={images}",
        f"root={root}",
        f"vg_root={vg_root}",
        "images_per_word=2",
        "shard_size=2",
        *TINY,
    ]
    assert main(argv) == 0
    bank = records.read_vg_vocab(vg_root / "vocab_VG_images_objs.jsonl")
    assert {"man", "shirt", "building", "street light", "light"} <= set(bank) and all(
        1 <= len(ids) <= 2 for ids in bank.values()
    )
    assert "a" not in bank and "the" not in bank
    train_objects = records.read_image_objects(root / "objects/flickr30k_train_imgs_objs.jsonl")
    assert (
        "man" in train_objects["148284"]
        and "shirt" in train_objects["148284"]
        and train_objects["134206"] == ["building", "light", "street light"]
    )
    assert set(records.read_image_objects(root / "objects/flickr30k_test_imgs_objs.jsonl")) == {
        "65567",
        "81641",
    }
    vg_images, vg_masks = (
        NpzImages(vg_root / "VG_images.64.npz", 64),
        NpzImages(vg_root / "VG_mask_images.64.npz", 64),
    )
    vg_images.require(sorted({i for ids in bank.values() for i in ids}), "VG image")
    vg_masks.require([f"{w}_{i}" for w, ids in bank.items() for i in ids], "VG mask")
    word, vg_id = "shirt", bank["shirt"][0]
    changed = np.any(vg_images[vg_id] != vg_masks[f"{word}_{vg_id}"], axis=0)
    assert 0 < changed.sum() < 64 * 64 and np.allclose(
        vg_masks[f"{word}_{vg_id}"][:, changed], BLACK[:, None]
    )


def test_visual_genome_needs_entities_and_valid_objects(flickr, tmp_path):
    layout, _, _ = flickr
    objects, images = vg_raw(tmp_path / "vg", image_ids=[1])
    cfg = vg_step.Config(
        objects=str(objects), images=str(images), root=str(layout.root), model="agree-tiny", pretrained=None
    )
    with pytest.raises(DataFormatError, match="no 'segs'; run `python -m agree.prepare entities` first"):
        vg_step.run(cfg)
    data = json.loads(objects.read_text())
    del data[0]["objects"][4]["h"]
    objects.write_text(json.dumps(data))
    with pytest.raises(DataFormatError, match=r"element 0.objects\[4\]: missing key 'h'"):
        vg_step.run(cfg)
