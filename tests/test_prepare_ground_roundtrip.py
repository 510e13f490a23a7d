"""``ground`` with tiny random-init detectors built here (no download), and the whole round trip:
raw Karpathy JSON + JPEGs and VG objects.json -> every release file -> train -> evaluate."""

import json
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from agree.atomic import write_jsonl
from agree.data.datasets import grounded_label, mask_entity
from agree.data.layout import ReleaseLayout
from agree.data.npz_images import NpzImages
from agree.data.pixels import CLIP_MEAN, CLIP_STD
from agree.data.records import NO_GROUNDING_LABEL, read_train_records
from agree.errors import ConfigError, DataFormatError
from agree.evaluate import evaluate
from agree.prepare.__main__ import main
from agree.train import train

from .test_prepare_steps import TINY, flickr_raw, vg_raw

transformers = pytest.importorskip(
    "transformers", reason="the prepare extra is not installed: pip install -e '.[prepare]'"
)
ground = pytest.importorskip("agree.prepare.ground")

BLACK = (0 - CLIP_MEAN) / CLIP_STD
SEGS = ["the players", "a man", "a yellow shirt", "the players of the baseball team on the field today"]


def owl(folder: Path, version: str) -> Path:
    """A tiny random OWL-ViT / OWLv2 (64 px, 4×4 patches) with a character-level CLIP tokenizer.

    The box head is zeroed so each patch predicts its own cell (random heads give empty boxes).
    """
    vocab = {}
    for c in string.ascii_lowercase + string.digits + "-',.":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1  # EOT: the largest id
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    n = len(vocab)
    names = {"owlvit": "OwlViT", "owlv2": "Owlv2"}[version]
    config = getattr(transformers, f"{names}Config")(
        text_config=dict(
            vocab_size=n,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=n - 2,
            eos_token_id=n - 1,
            pad_token_id=n - 1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=16,
        ),
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = getattr(transformers, f"{names}ForObjectDetection")(config)
    model.box_head.dense2.weight.data.zero_()
    model.box_head.dense2.bias.data.zero_()
    size = {"height": 64, "width": 64}
    image_processor = getattr(transformers, f"{names}ImageProcessor")(size=size, crop_size=size)
    processor = getattr(transformers, f"{names}Processor")(
        image_processor=image_processor, tokenizer=tokenizer
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def grounding_dino(folder: Path) -> Path:
    """A tiny random Grounding DINO (Swin 2 stages, 1-layer BERT) with a word-level BERT tokenizer."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *{w for s in SEGS for w in s.split()}]
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    config = transformers.GroundingDinoConfig(
        backbone_config=transformers.SwinConfig(
            image_size=64,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[1, 1],
            window_size=4,
            out_indices=[1, 2],
        ),
        text_config=transformers.BertConfig(
            vocab_size=len(words),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=10,
        num_feature_levels=2,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
    )
    torch.manual_seed(0)
    model = transformers.GroundingDinoForObjectDetection(config)
    image_processor = transformers.GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    model.save_pretrained(folder)
    transformers.GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(
        folder
    )
    return folder


DETECTORS = {
    "owlvit": lambda f: owl(f, "owlvit"),
    "owlv2": lambda f: owl(f, "owlv2"),
    "grounding-dino": grounding_dino,
}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """``karpathy`` output of the 8 real images, with hand-written ``segs`` (no spaCy needed)."""
    folder = tmp_path_factory.mktemp("ground")
    source, images = flickr_raw(folder)
    root = folder / "release"
    assert main(["karpathy", f"karpathy={source}", f"images={images}", f"root={root}", *TINY]) == 0
    path = root / "annotation" / "flickr30k_train_pred.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    write_jsonl(path, [{**row, "segs": SEGS[i % 2 :]} for i, row in enumerate(rows)])
    return root, images


@pytest.mark.parametrize("kind", DETECTORS)
def test_ground_writes_preds_and_masked_images(release, tmp_path, kind):
    source, images = release
    root = tmp_path / "release"
    shutil.copytree(source, root)
    detector = DETECTORS[kind](tmp_path / kind)
    argv = ["ground", f"root={root}", f"images={images}", f"detector={detector}", "shard_size=3", *TINY]
    assert main([*argv, "threshold=0", "max_words=7"]) == 0
    layout = ReleaseLayout(root, root.parent / "VG", 64)
    records = read_train_records(layout.train_records)
    masks = NpzImages(layout.grounding_npz, 64)
    train_images = NpzImages(layout.images_npz("train"), 64)
    labels = set()
    for record in records:
        queried = [s for s in record.segs if len(s.split()) <= 7]
        assert len(record.preds) == len(queried) == len(record.segs) - 1  # the 9-word entity is not queried
        for seg, (label, score) in zip(queried, record.preds, strict=True):
            assert label in (seg, NO_GROUNDING_LABEL) and 0 <= score <= 1
            if label != NO_GROUNDING_LABEL:
                labels.add((record.image_key, f"{record.flickr_id}_{label}"))
    assert labels and len(masks) == len(labels)
    for image_key, key in labels:  # the grounded box is black; the rest is the image
        changed = np.any(masks[key] != train_images[image_key], axis=0)
        assert changed.any() and np.allclose(masks[key][:, changed], BLACK[:, None], atol=1e-5)
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        assert changed[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].mean() > 0.9  # a box
    if kind == "owlv2":  # a threshold above every score: all "object", no masked image
        before = layout.train_records.read_bytes(), layout.grounding_npz.read_bytes()
        assert main([*argv, "threshold=1.01"]) == 1  # existing preds are kept unless overwrite=true
        assert (layout.train_records.read_bytes(), layout.grounding_npz.read_bytes()) == before
        assert main([*argv, "threshold=1.01", "overwrite=true"]) == 0
        assert all(
            label == NO_GROUNDING_LABEL
            for r in read_train_records(layout.train_records)
            for label, _ in r.preds
        )
        assert len(NpzImages(layout.grounding_npz, 64)) == 0


def test_ground_needs_segs_and_a_detector(release, tmp_path):
    source, images = release
    root = tmp_path / "release"
    shutil.copytree(source, root)
    path = root / "annotation" / "flickr30k_train_pred.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    write_jsonl(path, [{k: v for k, v in row.items() if k != "segs"} for row in rows])
    cfg = ground.Config(root=str(root), images=str(images), model="agree-tiny", pretrained=None)
    with pytest.raises(
        DataFormatError,
        match=r"flickr30k_train_pred.jsonl:1: no 'segs' list; run `python -m agree.prepare entities",
    ):
        ground.run(cfg)
    write_jsonl(path, rows)
    cfg.detector = str(tmp_path / "no-detector")
    with pytest.raises(ConfigError, match="no-detector'?: cannot load it"):
        ground.run(cfg)


def compose_config(name: str, *overrides: str):
    with initialize_config_module("agree.conf", version_base="1.3"):
        return compose(name, list(overrides))


def test_round_trip_prepared_files_train_and_evaluate(tmp_path):
    pytest.importorskip("spacy", reason="the prepare extra is not installed")
    source, images = flickr_raw(tmp_path / "raw")
    objects, vg_images = vg_raw(tmp_path / "raw" / "vg", image_ids=[1, 2, 3, 7, 8])
    root, vg_root, annotation = tmp_path / "flickr30k", tmp_path / "VG", tmp_path / "flickr30k" / "annotation"
    steps = [
        ["karpathy", f"karpathy={source}", f"images={images}", f"root={root}", *TINY],
        ["entities", f"input={annotation / 'flickr30k_train_pred.jsonl'}"],
        [
            "entities",
            f"input={annotation / 'flickr30k_test_texts.jsonl'}",
            f"output={annotation / 'flickr30k_test_texts_segs.jsonl'}",
        ],
        [
            "ground",
            f"root={root}",
            f"images={images}",
            f"detector={owl(tmp_path / 'owl', 'owlvit')}",
            "threshold=0",
            *TINY,
        ],
        [
            "visual-genome",
            f"objects={objects}",
            f"images={vg_images}",
            f"root={root}",
            "images_per_word=2",
            *TINY,
        ],
    ]
    for argv in steps:
        assert main(argv) == 0, argv
    common = ["model=tiny", "data=flickr30k", f"data.root={root}", "data.num_workers=0"]
    cfg = compose_config(
        "train",
        *common,
        "losses=agree",
        "data.batch_size=4",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        f"output_dir={tmp_path / 'train'}",
    )
    metrics, objects_used = train(cfg)
    assert metrics["val/rsum"] > 0
    header, *lines = (tmp_path / "train" / "csv" / "metrics.csv").read_text().splitlines()
    for name in ("clip", "prompt", "text_mask", "vg_contrast", "vg_mask", "ground_mask"):
        assert f"train/loss_{name}" in header
    # the prepared entity inputs are used, not the fallbacks
    dataset = objects_used["datamodule"].train_set
    assert sum(grounded_label(r) is not None for r in dataset.records) >= len(dataset.records) // 4
    vg = dataset.sources
    with_vg = [any(vg.vg_ids.get(w) for w in vg.image_objects.get(r.flickr_id, [])) for r in dataset.records]
    assert sum(with_vg) >= len(dataset.records) // 2
    assert all("[MASK]" in mask_entity(r.caption, e) for r in dataset.records for e in dataset.entities(r))

    evaluation = compose_config(
        "evaluate",
        *common,
        "rerank=egr",
        f"ckpt_path={tmp_path / 'train' / 'checkpoints' / 'last.ckpt'}",
        f"output_dir={tmp_path / 'evaluate'}",
        "device=cpu",
    )
    results = evaluate(evaluation)
    assert set(results) >= {"raw", "egr"} and results["raw"]["rsum"] > 0
    assert (tmp_path / "evaluate" / "predictions" / "egr_text_to_image.jsonl").is_file()
    assert vg_root.joinpath("VG_images.64.npz").is_file()
