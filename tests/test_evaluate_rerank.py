"""Evaluation with re-ranking stages, and from reference JSONL feature files (no model)."""

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from agree.data.evaluation_files import stage_results
from agree.data.feature_files import (
    load_features,
    read_entity_feature_jsonl,
    read_feature_jsonl,
    write_feature_jsonl,
)
from agree.errors import DataFormatError
from agree.evaluate import evaluate

SMALL = [
    "data.synthetic.train_images=10",
    "data.synthetic.val_images=4",
    "data.synthetic.test_images=30",
    "data.synthetic.vg_images_per_word=1",
]


def config(*overrides):
    with initialize_config_module("agree.conf", version_base="1.3"):
        return compose("evaluate", list(overrides))


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    """Zero-shot evaluation of the random-init tiny model with EGR then TBR."""
    root = tmp_path_factory.mktemp("data") / "scenes"
    out = tmp_path_factory.mktemp("eval")
    results = evaluate(
        config(f"output_dir={out}", f"data.root={root}", "rerank=egr_tbr", "rerank.k=10", *SMALL)
    )
    return root, out, results


def test_stages_written_and_tbr_keeps_recall_at_k(model_run):
    root, out, results = model_run
    assert list(results) == ["raw", "egr", "tbr", "probe"]  # the binding probe: tests/test_probe.py
    for stage in stage_results(results):
        for direction in ("text_to_image", "image_to_text"):
            lines = (out / "predictions" / f"{stage}_{direction}.jsonl").read_text().splitlines()
            assert len(json.loads(lines[0])["item_ids"]) == 10
            assert (out / "evaluation" / f"{stage}_{direction}.json").is_file()
        # TBR reorders the top 10 without changing its members
        assert results["tbr"][direction]["r10"] == pytest.approx(results["egr"][direction]["r10"])
    assert json.loads((out / "results.json").read_text()).keys() == results.keys()


def export_jsonl(out, folder):
    """The binary feature store of a model run, written as reference JSONL files."""
    paths = {}
    for name, id_key in (("images", "image_id"), ("texts", "query_id")):
        ids, features = load_features(out / "features", name)
        paths[name] = folder / f"{name}.jsonl"
        write_feature_jsonl(paths[name], id_key, ids, np.asarray(features))
    ids, valid = load_features(out / "features", "entity_valid")
    for name in ("entity_prompts", "entity_masks"):
        _, features = load_features(out / "features", name)
        paths[name] = folder / f"{name}.jsonl"
        write_feature_jsonl(paths[name], "query_id", ids, np.asarray(features), np.asarray(valid) > 0)
    return paths


def jsonl_config(root, out, paths, **replace):
    paths = {**paths, **replace}
    return config(
        f"output_dir={out}",
        "rerank=egr_tbr",
        "rerank.k=10",
        "model.name=no-model-needed",
        f"annotations.images={root}/annotation/flickr30k_test_images.jsonl",
        f"annotations.texts={root}/annotation/flickr30k_test_texts.jsonl",
        f"annotations.text_segs={root}/annotation/flickr30k_test_texts_segs.jsonl",
        f"features.image_jsonl={paths['images']}",
        f"features.text_jsonl={paths['texts']}",
        f"features.prompt_jsonl={paths['entity_prompts']}",
        f"features.mask_jsonl={paths['entity_masks']}",
    )


def test_jsonl_features_give_identical_results(model_run, tmp_path):
    root, out, results = model_run
    paths = export_jsonl(out, tmp_path)
    again = evaluate(jsonl_config(root, tmp_path / "out", paths))
    assert again == stage_results(results)  # no model to encode the probe's swaps
    for stage in again:
        name = f"{stage}_image_to_text.jsonl"
        assert (tmp_path / "out" / "predictions" / name).read_text() == (
            out / "predictions" / name
        ).read_text()
    # the store holds what the report reads; the entity files are not copied, a model's slots are
    stored = sorted(path.name for path in (tmp_path / "out" / "features").glob("*.npy"))
    assert stored == ["images.npy", "texts.npy"]
    assert (out / "features" / "entity_masks.npy").is_file()


def test_feature_jsonl_errors(model_run, tmp_path):
    root, out, _ = model_run
    paths = export_jsonl(out, tmp_path)
    lines = paths["images"].read_text().splitlines()
    # an annotated image without a feature
    (tmp_path / "short.jsonl").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DataFormatError, match="no feature for image"):
        evaluate(jsonl_config(root, tmp_path / "o1", paths, images=tmp_path / "short.jsonl"))
    # NaN, and a vector of another dimension, named by line
    row = json.loads(lines[3])
    row["feature"][0] = float("nan")
    (tmp_path / "nan.jsonl").write_text("\n".join(lines[:3] + [json.dumps(row)] + lines[4:]) + "\n")
    with pytest.raises(DataFormatError, match=r"nan.jsonl:4: image_id .*NaN"):
        read_feature_jsonl(tmp_path / "nan.jsonl", "image_id")
    row["feature"] = [0.0, 1.0]
    (tmp_path / "dim.jsonl").write_text("\n".join(lines[:3] + [json.dumps(row)] + lines[4:]) + "\n")
    with pytest.raises(DataFormatError, match=r"dim.jsonl:4: feature of shape \(2,\)"):
        read_feature_jsonl(tmp_path / "dim.jsonl", "image_id")
    assert not (tmp_path / "o1" / "results.json").exists()


def test_texts_and_images_must_share_the_dimension(model_run, tmp_path):
    root, out, _ = model_run
    paths = export_jsonl(out, tmp_path)
    ids, features = read_feature_jsonl(paths["images"], "image_id")
    write_feature_jsonl(tmp_path / "wide.jsonl", "image_id", ids, np.pad(features, ((0, 0), (0, 3))))
    with pytest.raises(DataFormatError, match="d features but"):
        evaluate(jsonl_config(root, tmp_path / "o", paths, images=tmp_path / "wide.jsonl"))


def test_queries_without_entities_are_kept(tmp_path):
    (tmp_path / "p.jsonl").write_text(
        '{"query_id": 1, "feature": []}\n{"query_id": 2, "feature": [[1, 2], [3, 4]]}\n'
    )
    ids, features, valid = read_entity_feature_jsonl(tmp_path / "p.jsonl", max_entities=3)
    assert ids == ["1", "2"] and features.shape == (2, 3, 2)
    assert valid.tolist() == [[False, False, False], [True, True, False]]


def test_egr_without_entity_features_fails_up_front(model_run, tmp_path):
    root, out, _ = model_run
    paths = export_jsonl(out, tmp_path)
    cfg = jsonl_config(root, tmp_path / "o", paths)
    cfg.features.prompt_jsonl = None
    with pytest.raises(ValueError, match="features.prompt_jsonl"):
        evaluate(cfg)
    assert not (tmp_path / "o").exists()
