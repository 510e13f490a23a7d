"""Evaluation from reference feature files loads no model, Lightning or W&B code."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from agree.atomic import write_jsonl
from agree.data.feature_files import write_feature_jsonl

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("open_clip", "lightning", "pytorch_lightning", "lightning_fabric", "wandb", "torchmetrics", "timm")

EVALUATE = """
import json, sys
from hydra import compose, initialize_config_module
from agree.evaluate import evaluate
with initialize_config_module("agree.conf", version_base="1.3"):
    cfg = compose("evaluate", sys.argv[1:])
results = evaluate(cfg)
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
print(json.dumps({"heavy": heavy, "rsum": results["egr_tbr"]["rsum"]}))
"""


def test_feature_file_evaluation_imports_no_model_code(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n_images, dim, slots = 6, 8, 3
    images = rng.standard_normal((n_images, dim)).astype(np.float32)
    texts = np.repeat(images, 2, axis=0) + 0.1 * rng.standard_normal((2 * n_images, dim)).astype(np.float32)
    image_ids, query_ids = [str(100 + i) for i in range(n_images)], [str(i) for i in range(2 * n_images)]
    write_jsonl(
        tmp_path / "texts.jsonl",
        [
            {"query_id": i, "query_text": f"caption {i}", "item_ids": [100 + i // 2]}
            for i in range(2 * n_images)
        ],
    )
    write_jsonl(
        tmp_path / "images.jsonl",
        [{"image_id": 100 + i, "item_ids": [2 * i, 2 * i + 1]} for i in range(n_images)],
    )
    write_feature_jsonl(tmp_path / "f_images.jsonl", "image_id", image_ids, images)
    write_feature_jsonl(tmp_path / "f_texts.jsonl", "query_id", query_ids, texts)
    valid = np.arange(slots)[None, :] < rng.integers(0, slots + 1, (2 * n_images, 1))
    entities = rng.standard_normal((2 * n_images, slots, dim)).astype(np.float32)
    for name in ("prompts", "masks"):
        write_feature_jsonl(tmp_path / f"f_{name}.jsonl", "query_id", query_ids, entities, valid)
    write_jsonl(  # each query's entity count: the real slots of the feature files (features.mask_padding)
        tmp_path / "segs.jsonl",
        [
            {
                "query_id": i,
                "query_text": f"caption {i}",
                "items": [f"entity {j}" for j in range(valid[i].sum())],
            }
            for i in range(2 * n_images)
        ],
    )
    overrides = [
        f"output_dir={tmp_path / 'out'}",
        "rerank=egr_tbr",
        "rerank.k=5",
        f"annotations.images={tmp_path / 'images.jsonl'}",
        f"annotations.texts={tmp_path / 'texts.jsonl'}",
        f"annotations.text_segs={tmp_path / 'segs.jsonl'}",
        f"features.image_jsonl={tmp_path / 'f_images.jsonl'}",
        f"features.text_jsonl={tmp_path / 'f_texts.jsonl'}",
        f"features.prompt_jsonl={tmp_path / 'f_prompts.jsonl'}",
        f"features.mask_jsonl={tmp_path / 'f_masks.jsonl'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", EVALUATE % (HEAVY,), *overrides], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert report["rsum"] > 0 and (tmp_path / "out" / "results.json").is_file()
