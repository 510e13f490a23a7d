"""The binding probe: known answers by hand, and in an evaluation's results, table and report."""

import json

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from agree.data.entities import kept_entities
from agree.data.records import read_test_texts, read_text_segs
from agree.data.swaps import draw_swaps
from agree.evaluate import evaluate
from agree.report import write_report
from agree.report.table import format_table
from agree.retrieval.probe import SwapFeatures, swap_accuracy
from agree.summary import format_summary, summary_row

# three captions of two images; caption 2 is shown by both
POSITIVES = torch.tensor([[0, -1], [1, -1], [0, 1]])
IMAGES = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), dim=-1)
TEXTS = F.normalize(torch.tensor([[1.0, 0.2, 0.0], [0.1, 1.0, 0.0], [1.0, 1.0, 0.1]]), dim=-1)
ROWS = torch.tensor([0, 1, 2])


def test_a_model_blind_to_binding_scores_half():
    """A swap encoded like its caption ties on every image: each tie counts half."""
    assert swap_accuracy(IMAGES, TEXTS, SwapFeatures(TEXTS.clone(), ROWS), POSITIVES) == {
        "swap_accuracy": 0.5,
        "n": 3,
    }


def test_a_model_that_prefers_the_true_caption_scores_all():
    swaps = SwapFeatures(F.normalize(torch.tensor([[0.0, 0.0, 1.0]] * 3), dim=-1), ROWS)
    assert swap_accuracy(IMAGES, TEXTS, swaps, POSITIVES) == {"swap_accuracy": 1.0, "n": 3}


def test_the_share_of_each_captions_images_then_the_mean_over_captions():
    # caption 0's swap wins on its image; caption 2's swap wins on image 1 but not on image 0
    swap_features = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]), dim=-1)
    got = swap_accuracy(IMAGES, TEXTS, SwapFeatures(swap_features, torch.tensor([0, 2])), POSITIVES)
    assert got["n"] == 2 and got["swap_accuracy"] == pytest.approx((0 + 0.5) / 2)


# --------------------------------------------------------------------------------------------
# in an evaluation

SMALL = [
    "data.synthetic.train_images=10",
    "data.synthetic.val_images=4",
    "data.synthetic.test_images=12",
    "data.synthetic.vg_images_per_word=1",
]


def config(*overrides):
    with initialize_config_module("agree.conf", version_base="1.3"):
        return compose("evaluate", list(overrides))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The random-init tiny model on small scenes, raw search and TBR."""
    root = tmp_path_factory.mktemp("data") / "scenes"
    out = tmp_path_factory.mktemp("eval")
    results = evaluate(config(f"output_dir={out}", f"data.root={root}", "rerank=tbr", *SMALL))
    return root, out, results


def test_results_hold_the_probe_beside_the_stages(evaluated):
    root, out, results = evaluated
    texts = read_test_texts(root / "annotation" / "flickr30k_test_texts.jsonl")
    segs = read_text_segs(root / "annotation" / "flickr30k_test_texts_segs.jsonl")
    swaps = draw_swaps([t.text for t in texts], [kept_entities(segs[t.query_id], None, 10) for t in texts], 0)
    assert list(results) == ["raw", "tbr", "probe"]
    probe = results["probe"]
    assert probe["n"] == sum(s is not None for s in swaps) == len(texts)  # every scene has two objects
    assert 0 <= probe["swap_accuracy"] <= 1
    assert json.loads((out / "results.json").read_text())["probe"] == probe
    assert f"swap accuracy {100 * probe['swap_accuracy']:.1f} % over {probe['n']} captions" in format_table(
        results
    )
    page = write_report(out).read_text()
    assert "Binding probe" in page and f"{100 * probe['swap_accuracy']:.1f} %" in page
    rows = [summary_row("zero-shot", "none", "raw", results["raw"], probe)]
    assert format_summary(rows).splitlines()[1].endswith(f"{100 * probe['swap_accuracy']:.1f}")
    assert format_summary([summary_row("zero-shot", "none", "raw", results["raw"])]).endswith("-")


def test_no_probe_when_off_or_without_test_entities(evaluated, tmp_path):
    root, _, results = evaluated
    off = evaluate(config(f"output_dir={tmp_path / 'off'}", f"data.root={root}", "probe=false", *SMALL))
    assert "probe" not in off and off["raw"] == results["raw"]
    # a release folder without the segs file: the probe is skipped, nothing else changes
    release = tmp_path / "release"
    (release / "annotation").mkdir(parents=True)
    for name in ("flickr30k_test_texts.jsonl", "flickr30k_test_images.jsonl", "flickr30k_test_images.npz"):
        (release / "annotation" / name).symlink_to(root / "annotation" / name)
    none = evaluate(config(f"output_dir={tmp_path / 'none'}", "data=flickr30k", f"data.root={release}"))
    assert "probe" not in none and none["raw"] == results["raw"]
