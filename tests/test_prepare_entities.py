"""Textual entities with spaCy: the SPEC example, real Flickr30k captions, both file kinds, masking."""

import csv
import json
import re

import pytest

from agree.data.datasets import mask_entity
from agree.data.records import read_text_segs, read_train_records
from agree.errors import ConfigError, DataFormatError
from agree.prepare.__main__ import main

from .conftest import SHARED_DATA

pytest.importorskip("spacy", reason="the prepare extra is not installed: pip install -e '.[prepare]'")
entities = pytest.importorskip("agree.prepare.entities")
try:
    entities.load_pipeline("en_core_web_sm")
except ConfigError as e:
    pytest.skip(str(e), allow_module_level=True)

MULTI30K_TEST = SHARED_DATA / "flickr30k_captions_multi30k" / "test_1k_captions.tsv"


def test_spec_example():
    (segs,) = entities.caption_entities(["Four men on top of a tall structure."])
    assert segs[:3] == ["four men", "top", "a tall structure"]  # the noun chunks first
    assert {"top of a tall structure", "four men on top of a tall structure"} <= set(segs)


def test_real_captions_give_spans_of_their_caption():
    if not MULTI30K_TEST.is_file():
        pytest.skip(f"{MULTI30K_TEST} not available")
    with open(MULTI30K_TEST, encoding="utf-8") as f:
        captions = [row["caption"] for row in csv.DictReader(f, delimiter="\t")][:400]
    segs = entities.caption_entities(captions)
    assert sum(map(len, segs)) / len(captions) > 3
    assert sum(not s for s in segs) <= 2  # nearly every caption has an entity
    for caption, found in zip(captions, segs, strict=True):
        assert len(found) == len(set(found))
        for entity in found:
            assert entity == entity.lower() == entity.strip() and entity in caption.lower(), (caption, entity)
            assert not re.search(r"^[^\w\s]+\s|\s[^\w\s]+$", entity), (caption, entity)  # punctuation trimmed
            assert "[MASK]" in mask_entity(caption, entity)  # masking works on the cased caption
    by_caption = dict(zip(captions, segs, strict=True))
    assert "an orange hat" in by_caption["The man with pierced ears is wearing glasses and an orange hat."]


def test_masking_ignores_case_only():
    assert (
        mask_entity("Four men on top of a tall structure.", "four men")
        == "[MASK] on top of a tall structure."
    )
    assert mask_entity("A man (left) and a man.", "a man") == "[MASK] (left) and [MASK]."
    assert mask_entity("a b.c", "b.c") == "a [MASK]" and mask_entity("a bxc", "b.c") == "a bxc"


def test_train_file_in_place_and_test_texts_to_segs_file(tmp_path):
    train = tmp_path / "annotation" / "flickr30k_train_pred.jsonl"
    train.parent.mkdir()
    lines = [
        {
            "image": "flickr30k-images/1.jpg",
            "caption": "Two dogs play in the snow .",
            "image_id": 0,
            "extra": 1,
        },
        {
            "image": "flickr30k-images/1.jpg",
            "caption": "A dog is running on the beach .",
            "image_id": 0,
            "segs": ["old"],
        },
    ]
    train.write_text("".join(json.dumps(line) + "\n" for line in lines))
    before = train.read_bytes()
    assert main(["entities", f"input={train}", "shard_size=1"]) == 1  # existing segs are kept ...
    assert train.read_bytes() == before
    assert main(["entities", f"input={train}", "shard_size=1", "overwrite=true"]) == 0  # ... unless asked
    records = read_train_records(train)
    assert records[0].segs == ("two dogs", "the snow") and records[1].segs == ("a dog", "the beach")
    assert json.loads(train.read_text().splitlines()[0])["extra"] == 1  # other keys kept
    assert not (tmp_path / "annotation" / "flickr30k_train_pred.jsonl.parts").exists()

    texts = tmp_path / "annotation" / "flickr30k_test_texts.jsonl"
    texts.write_text(
        json.dumps({"query_id": 7, "query_text": "A girl with a kite .", "item_ids": [3]}) + "\n"
    )
    assert main(["entities", f"input={texts}"]) == 0
    segs_file = tmp_path / "annotation" / "flickr30k_test_texts_segs.jsonl"
    assert read_text_segs(segs_file) == {"7": ["a girl", "a kite", "a girl with a kite"]}
    assert json.loads(segs_file.read_text())["query_text"] == "A girl with a kite ."


@pytest.mark.parametrize(
    "content, fragment",
    [
        ('{"image": "x.jpg"}\n', ":1: no caption: expected a train jsonl ('caption') or test texts"),
        ('{"caption": "a dog"}\n{"caption": 3}\n', ":2: key 'caption' should be str"),
        ('{"caption": "a dog"\n', ":1: malformed JSON"),
    ],
)
def test_bad_input_is_named(tmp_path, content, fragment):
    path = tmp_path / "in.jsonl"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=re.escape("in.jsonl" + fragment)):
        entities.run(entities.Config(input=str(path)))


def test_missing_pipeline_is_a_config_error():
    with pytest.raises(ConfigError, match="pipeline='xx_nope': spaCy pipeline not installed"):
        entities.load_pipeline("xx_nope")
