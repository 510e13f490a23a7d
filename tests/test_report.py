"""The HTML report of an evaluation (and of a training run), checked as text and in a real browser."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from PIL import Image

from agree.data.pixels import OPENAI_MEAN, OPENAI_STD, normalise, thumbnail
from agree.evaluate import evaluate
from agree.report import write_report
from agree.report.__main__ import main
from agree.report.load import CURVE_K, load_evaluation, recall_curves
from agree.report.page import TOP

from .test_progress_and_wandb import SCENES

QUERIES = 4
STAGES = ("raw", "egr", "egr_tbr")
DATA_URI = re.compile(r'<img[^>]* src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def evaluated(scenes, tmp_path_factory):
    """An evaluation with EGR and TBR (the pretrained tiny model on the small scenes, so ground truth
    shows among the examples' top images whatever the data's seed) and its report."""
    out = tmp_path_factory.mktemp("evaluate")
    with initialize_config_module("agree.conf", version_base="1.3"):
        cfg = compose(
            "evaluate",
            [
                f"output_dir={out}",
                f"data.root={scenes.root}",
                *SCENES,
                "rerank=egr_tbr",
                "model=scenes_pretrained",
            ],
        )
    evaluate(cfg)
    return out, write_report(out, queries=QUERIES)


def test_evaluate_records_where_the_report_inputs_are(evaluated, scenes):
    out, _ = evaluated
    inputs = json.loads((out / "report_inputs.json").read_text())
    assert inputs == {
        "texts": str(scenes.test_texts),
        "images": str(scenes.test_images),
        "images_npz": str(scenes.images_npz("test")),
        "image_size": 64,
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
    }


def test_recall_curves_agree_with_the_results(evaluated):
    out, _ = evaluated
    results = json.loads((out / "results.json").read_text())
    curves = recall_curves(load_evaluation(out))
    assert list(curves) == list(STAGES)
    for stage, block in curves.items():
        for direction, curve in block.items():
            assert len(curve) == CURVE_K  # raw from the features; EGR options keep 20 (rerank.k)
            assert curve == sorted(curve) and curve[-1] <= 100
            for k in (1, 5, 10):
                assert curve[k - 1] == pytest.approx(results[stage][direction][f"r{k}"])
    with Image.open(out / "recall_curves.png") as plot:
        assert plot.size[0] >= 800 and len(plot.convert("RGB").getcolors(1 << 16)) > 50


def test_report_is_self_contained_with_thumbnails_and_rank_changes(evaluated):
    out, path = evaluated
    page = path.read_text()
    assert path == out / "report.html"
    assert "http://" not in page and "https://" not in page and "src=" in page
    assert not re.search(r'src="(?!data:)', page)  # every image inlined
    # the plot, then per text query 5 images for each of the 3 stages, and each image query
    images = DATA_URI.findall(page)
    assert len(images) == 1 + QUERIES * len(STAGES) * TOP + QUERIES
    assert page.count('<figure class="card') == 2 * QUERIES * len(STAGES) * TOP
    assert page.count('class="card gt"') >= 1
    assert re.search(r"[▲▼]\d", page) and "ground truth at #" in page
    for label in ("raw search", "EGR", "EGR + TBR", "R@1", "RSUM", "Examples: text → image", "image → text"):
        assert label in page
    assert page.count("<tr><td>EGR + TBR</td>") == 2  # a table row per direction


def test_thumbnail_undoes_clip_normalisation():
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    picture = thumbnail(normalise(pixels), 16)
    assert np.abs(np.asarray(picture, dtype=np.int16) - pixels).max() <= 1


def test_training_run_report(tmp_path):
    run = tmp_path / "run"
    (run / "csv").mkdir(parents=True)
    names = ["t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "rsum"]
    final = {f"val/{n}": v for n, v in zip(names, [40.0, 80.0, 90.0, 45.0, 85.0, 95.0, 435.0], strict=True)}
    (run / "metrics.json").write_text(json.dumps(final))
    header = "epoch,step,train/loss," + ",".join(f"val/{n}" for n in names)
    rows = [
        "0,9,2.1," + ",".join("1" for _ in names),
        "0,10,2.0,,,,,,,",
        "1,19,," + ",".join("2" for _ in names),
    ]
    (run / "csv" / "metrics.csv").write_text("\n".join([header, *rows]) + "\n")
    page = write_report(run).read_text()
    assert "Final validation" in page and "435.0" in page and "<td>19</td>" in page
    assert len(DATA_URI.findall(page)) == 1
    with Image.open(run / "val_metrics.png") as plot:
        assert len(plot.convert("RGB").getcolors(1 << 16)) > 50


def test_cli_prints_the_path_and_names_what_it_expected(evaluated, tmp_path, capsys):
    out, _ = evaluated
    main([f"directory={out}"])
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    with pytest.raises(
        SystemExit, match=r"expected results.json \(an agree.evaluate output\) or metrics.json"
    ):
        main([f"directory={tmp_path}"])
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="report_inputs.json: not found"):
        main([f"directory={tmp_path}"])


def test_cli_help_lists_its_keys_and_a_wrong_key_is_one_line(capsys):
    main(["--help"])
    assert capsys.readouterr().out.splitlines()[-3:] == ["  directory=???", "  queries=6", "  seed=0"]
    with pytest.raises(SystemExit, match=r"^config error: .*queries.*"):
        main(["directory=.", "queries=six"])
    with pytest.raises(SystemExit, match="unknown key 'query'"):
        main(["directory=.", "query=6"])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(tmp_path, *args: str) -> str:
    """Run headless Chromium with a fresh profile; its stdout."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    done = subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")
def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    _, path = evaluated
    # the page marks on <body> how many images the browser decoded
    dom = chromium(tmp_path, "--dump-dom", path.as_uri())
    loaded = re.search(r'<body[^>]*data-images-loaded="(\d+)/(\d+)"', dom)
    expected = len(DATA_URI.findall(path.read_text()))
    assert loaded and int(loaded[1]) == int(loaded[2]) == expected
    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", path.as_uri())
    with Image.open(shot) as picture:
        rgb = np.asarray(picture.convert("RGB"))
    assert rgb.shape[:2] == (2400, 1280)
    colours = {tuple(c) for c in rgb.reshape(-1, 3)[::7]}
    assert len(colours) > 500  # text, the plot's lines and the (noisy) thumbnails, not a blank page
    for line in ((31, 119, 180), (255, 127, 14)):  # matplotlib's first two line colours: the plot drew
        assert (np.abs(rgb.astype(int) - line).max(-1) <= 8).sum() > 200
