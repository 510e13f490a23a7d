"""Readers accept the release's formats and reject each kind of bad input with a one-line error."""

import json

import numpy as np
import pytest

from agree.atomic import write_npz
from agree.data import json_lines, records
from agree.data.npz_images import NpzImages
from agree.errors import DataFormatError

SPEC_TRAIN_LINE = (
    '{"image": "flickr30k-images/10002456.jpg", "caption": "Four men on top of a tall structure.", '
    '"image_id": 1, "segs": ["four men", "top of a tall structure", "top", '
    '"four men on top of a tall structure.", "a tall structure"], '
    '"preds": [{"men": 0.623}, {"object": 0.607}, {"top": 0.625}, {"a tall structure": 0.505}]}'
)


def one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_spec_train_example_parses(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(SPEC_TRAIN_LINE + "\n")
    (record,) = records.read_train_records(path)
    assert record.image_key == "1" and record.flickr_id == "10002456"
    assert record.segs[-1] == "a tall structure"
    assert record.preds[1] == ("object", 0.607)


def test_ids_compare_as_integers():
    assert json_lines.canonical_id("0042") == json_lines.canonical_id(42) == "42"
    assert json_lines.canonical_id("abc") == "abc"


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('{"image": "a.jpg", "caption": "x", "image_id": 1', "malformed JSON"),
        ('{"image": "a.jpg", "image_id": 1}', "missing key 'caption'"),
        ('{"image": "a.jpg", "caption": 5, "image_id": 1}', "'caption' should be str"),
        ('["not", "an", "object"]', "expected a JSON object"),
        ('{"image": "a.jpg", "caption": "x", "image_id": 1, "preds": [{"a": "high"}]}', "not a number"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, fragment):
    path = tmp_path / "train.jsonl"
    path.write_text(SPEC_TRAIN_LINE + "\n" + line + "\n")
    with pytest.raises(DataFormatError) as excinfo:
        records.read_train_records(path)
    one_line_error(excinfo, f"{path}:2", fragment)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataFormatError) as excinfo:
        records.read_test_texts(tmp_path / "absent.jsonl")
    one_line_error(excinfo, "file not found")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataFormatError) as excinfo:
        records.read_test_texts(tmp_path / "empty.jsonl")
    one_line_error(excinfo, "no records")


def test_duplicate_query_ids(tmp_path):
    path = tmp_path / "texts.jsonl"
    rows = [
        {"query_id": 1, "query_text": "a", "item_ids": [1]},
        {"query_id": "1", "query_text": "b", "item_ids": [1]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataFormatError) as excinfo:
        records.read_test_texts(path)
    one_line_error(excinfo, f"{path}:2", "duplicate query_id 1")


def test_val_json_errors(tmp_path):
    path = tmp_path / "val.json"
    path.write_text('[{"image": "a.jpg", "caption": ["x"]}, {"image": "b.jpg"}]')
    with pytest.raises(DataFormatError) as excinfo:
        records.read_val_records(path)
    one_line_error(excinfo, "element 1", "missing key 'caption'")
    path.write_text('[{"image": "a.jpg", "caption": ["x"]},')
    with pytest.raises(DataFormatError) as excinfo:
        records.read_val_records(path)
    one_line_error(excinfo, "malformed JSON")


def good_image(size=8):
    return np.zeros((3, size, size), dtype=np.float32)


@pytest.mark.parametrize(
    "array, fragment",
    [
        (np.zeros((3, 8, 9), dtype=np.float32), "shape (3, 8, 9), expected (3, 8, 8)"),
        (np.zeros((3, 8, 8), dtype=np.int64), "dtype int64"),
        (np.full((3, 8, 8), np.nan, dtype=np.float32), "NaN"),
    ],
)
def test_bad_npz_arrays(tmp_path, array, fragment):
    path = tmp_path / "images.npz"
    write_npz(path, {"1": good_image(), "2": array})
    images = NpzImages(path, 8)
    assert images["1"].shape == (3, 8, 8)
    with pytest.raises(DataFormatError) as excinfo:
        images[2]
    one_line_error(excinfo, str(path), "'2'", fragment)


def test_npz_missing_id_and_pickle(tmp_path):
    path = tmp_path / "images.npz"
    write_npz(path, {"1": good_image(), "obj": np.array([{"a": 1}], dtype=object)})
    images = NpzImages(path, 8)
    with pytest.raises(DataFormatError) as excinfo:
        images.require(["1", "7"], "test image_id")
    one_line_error(excinfo, str(path), "no array for test image_id '7'")
    with pytest.raises(DataFormatError) as excinfo:
        images["obj"]
    one_line_error(excinfo, "pickle")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataFormatError) as excinfo:
        NpzImages(tmp_path / "bad.npz", 8)
    one_line_error(excinfo, "not an npz archive")


def test_generated_release_reads_back(scenes):
    """Every file the generator writes is read by the same readers as the real release."""
    train = records.read_train_records(scenes.train_records)
    val = records.read_val_records(scenes.val_records)
    texts = records.read_test_texts(scenes.test_texts)
    images = records.read_test_images(scenes.test_images)
    segs = records.read_text_segs(scenes.test_text_segs)
    vocab = records.read_vg_vocab(scenes.vg_vocab)
    assert len({r.image_key for r in train}) == 60 and len(val) == 12 and len(images) == 20
    assert len(texts) == 100 and set(segs) == {t.query_id for t in texts}
    NpzImages(scenes.images_npz("train"), 64).require([r.image_key for r in train], "train image")
    NpzImages(scenes.images_npz("val"), 64).require([r.image_key for r in val], "val image")
    test_npz = NpzImages(scenes.images_npz("test"), 64)
    test_npz.require([im.image_id for im in images], "test image")
    assert test_npz[images[0].image_id].dtype == np.float32
    # entities are spans of their caption, grounded labels have masks, VG masks exist
    grounding = NpzImages(scenes.grounding_npz, 64)
    for record in train:
        assert all(seg in record.caption for seg in record.segs)
        for label, _ in record.preds:
            if label != records.NO_GROUNDING_LABEL:
                assert f"{record.flickr_id}_{label}" in grounding
    masks = NpzImages(scenes.vg_mask_images_npz, 64)
    vg_images = NpzImages(scenes.vg_images_npz, 64)
    for word, ids in vocab.items():
        assert ids
        vg_images.require(ids, "VG image")
        masks.require([f"{word}_{i}" for i in ids], "VG mask")
    for split in ("train", "val", "test"):
        objects = records.read_image_objects(scenes.image_objects(split))
        assert all(set(words) <= set(vocab) for words in objects.values())
