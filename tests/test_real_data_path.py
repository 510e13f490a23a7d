"""The real-data path as a new user walks it: karpathy, entities, train, evaluate, on real Flickr30k.

The smallest real dataset is built here from the 8 Flickr30k photos of ``../shared/data`` with
their real captions (4 train, 2 val, 2 test), prepared for the tiny model (64 px).
"""

import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from agree.atomic import write_jsonl
from agree.data.evaluation_files import stage_results
from agree.data.pixels import OPENAI_MEAN, OPENAI_STD
from agree.data.records import prepared_fields, read_train_records
from agree.errors import ConfigError, DataFormatError
from agree.evaluate import evaluate
from agree.prepare import karpathy as karpathy_step
from agree.prepare import visual_genome as vg_step
from agree.prepare.__main__ import STEPS
from agree.prepare.__main__ import main as prepare
from agree.report import write_report
from agree.report.table import format_table
from agree.train import train

from .test_prepare_steps import flickr_raw, vg_raw

REPO = Path(__file__).resolve().parents[1]


def config(name, *overrides):
    with initialize_config_module("agree.conf", version_base="1.3"):
        return compose(name, list(overrides))


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """(Karpathy JSON, image folder) of the 8 real photos."""
    return flickr_raw(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    """``agree.prepare karpathy`` output for the tiny model: no entities yet."""
    source, images = raw
    root = tmp_path_factory.mktemp("prepared") / "flickr30k"
    assert prepare(["karpathy", f"karpathy={source}", f"images={images}", f"root={root}", "model=tiny"]) == 0
    return root


def train_overrides(root, out, *extra):
    return [
        "data=flickr30k",
        f"data.root={root}",
        f"output_dir={out}",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "optim.warmup_steps=1",
        "trainer.log_every_n_steps=1",
        *extra,
    ]


ENTITY_LOSSES = ["losses=agree", "losses.vg_contrast=0", "losses.vg_mask=0", "losses.ground_mask=0"]


# ---------------------------------------------------------------------------------------------
# row 1: a loss whose inputs the data lacks


def test_entity_losses_before_entities_stop_naming_the_file_and_command(prepared, tmp_path):
    out = tmp_path / "run"
    cfg = config("train", *train_overrides(prepared, out, *ENTITY_LOSSES))
    with pytest.raises(ConfigError) as excinfo:
        train(cfg)
    message = one_line(excinfo)
    train_file = prepared / "annotation" / "flickr30k_train_pred.jsonl"
    assert f"{train_file}:1" in message and "'segs'" in message, message
    assert f"python -m agree.prepare entities input={train_file}" in message, message
    assert "losses.prompt=0" in message and "losses.text_mask=0" in message, message
    assert not out.exists()


def test_a_training_line_without_segs_is_named_when_the_dataset_reads_it(prepared, tmp_path):
    """The settings read the first line only; the dataset checks every line it reads."""
    path = tmp_path / "train.jsonl"
    rows = [
        json.loads(line)
        for line in (prepared / "annotation/flickr30k_train_pred.jsonl").read_text().splitlines()
    ]
    write_jsonl(path, [row if i == 2 else {**row, "segs": []} for i, row in enumerate(rows)])
    assert len(read_train_records(path)) == len(rows)  # absent: read as no entities
    with pytest.raises(DataFormatError) as excinfo:
        read_train_records(path, prepared_fields({"prompts"}))
    message = one_line(excinfo)
    assert f"{path}:3: no 'segs'" in message and "python -m agree.prepare entities" in message, message


def test_ground_mask_without_preds_names_the_ground_step(prepared, tmp_path):
    root = tmp_path / "flickr30k"
    shutil.copytree(prepared, root)
    (root / "flickr30k_visual_grounding.64.npz").write_bytes(
        (prepared / "annotation" / "flickr30k_test_images.npz").read_bytes()
    )
    out = tmp_path / "run"
    cfg = config("train", *train_overrides(root, out, "losses.ground_mask=0.1"))
    with pytest.raises(ConfigError) as excinfo:
        train(cfg)
    message = one_line(excinfo)
    assert "flickr30k_train_pred.jsonl:1" in message and "'preds'" in message, message
    assert "python -m agree.prepare ground" in message and "losses.ground_mask=0" in message, message
    assert not out.exists()


@pytest.fixture(scope="module")
def release(prepared, tmp_path_factory):
    """``prepared`` with the entities of its train captions and test texts (``agree.prepare entities``);
    the first caption's entities emptied: a caption may legitimately have none."""
    pytest.importorskip("spacy", reason="the prepare extra is not installed: pip install -e '.[prepare]'")
    root = tmp_path_factory.mktemp("release") / "flickr30k"
    shutil.copytree(prepared, root)
    annotation = root / "annotation"
    assert prepare(["entities", f"input={annotation / 'flickr30k_train_pred.jsonl'}"]) == 0
    assert prepare(["entities", f"input={annotation / 'flickr30k_test_texts.jsonl'}"]) == 0
    rows = [json.loads(line) for line in (annotation / "flickr30k_train_pred.jsonl").read_text().splitlines()]
    rows[0]["segs"] = []
    write_jsonl(annotation / "flickr30k_train_pred.jsonl", rows)
    return root


@pytest.fixture(scope="module")
def trained(release, tmp_path_factory):
    """A run of the tiny model on ``release`` with the entity losses: its checkpoint."""
    out = tmp_path_factory.mktemp("trained") / "run"
    metrics, _ = train(config("train", *train_overrides(release, out, *ENTITY_LOSSES)))
    assert "val/rsum" in metrics
    return out / "checkpoints" / "last.ckpt"


def test_entity_losses_train_when_some_captions_have_no_entity(trained):
    history = (trained.parents[1] / "csv" / "metrics.csv").read_text()
    assert "train/loss_prompt" in history and "train/loss_text_mask" in history


# ---------------------------------------------------------------------------------------------
# row 2: a checkpoint evaluated on data other than its own


def test_checkpoint_evaluated_without_its_data_stops_before_generating_scenes(
    trained, release, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # where data=synthetic would generate its scenes (data/...)
    out = tmp_path / "eval"
    with pytest.raises(ConfigError) as excinfo:
        evaluate(config("evaluate", f"ckpt_path={trained}", f"output_dir={out}", "rerank=tbr"))
    message = one_line(excinfo)
    assert f"ckpt_path={trained}" in message and f"data=flickr30k data.root={release}" in message, message
    assert "ckpt_data=any" in message, message
    assert not (tmp_path / "data").exists() and not out.exists()


# ---------------------------------------------------------------------------------------------
# row 3 (and issue 20 row 16): karpathy refuses an image in two splits, two images of one id


def karpathy_with(raw, tmp_path, edit):
    """``karpathy`` on the real JSON changed by ``edit(images list, image folder)``: the error line."""
    source, images = raw
    data = json.loads(source.read_text())
    folder = tmp_path / "flickr30k-images"
    shutil.copytree(images, folder)
    edit(data["images"], folder)
    changed = tmp_path / "dataset_flickr30k.json"
    changed.write_text(json.dumps(data))
    root = tmp_path / "out"
    cfg = karpathy_step.Config(
        karpathy=str(changed), images=str(folder), root=str(root), model="agree-tiny", pretrained=None
    )
    with pytest.raises(DataFormatError) as excinfo:
        karpathy_step.run(cfg)
    assert not root.exists()  # refused before anything is written
    return one_line(excinfo)


@pytest.mark.parametrize(
    "split, where", [("test", "in split 'train' and in 'test'"), ("train", "twice in split 'train'")]
)
def test_karpathy_refuses_an_image_listed_twice(raw, tmp_path, split, where):
    def leak(entries, folder):
        entries.append({**entries[0], "split": split})

    message = karpathy_with(raw, tmp_path, leak)
    assert "images[0] and images[8]" in message and "flickr30k-images/134206.jpg" in message, message
    assert where in message, message


def test_karpathy_refuses_test_images_of_the_same_id(raw, tmp_path):
    def renamed(entries, folder):
        test = [e for e in entries if e["split"] == "test"]
        for entry, name in zip(test, ("0042.jpg", "42.jpg"), strict=True):
            (folder / entry["filename"]).rename(folder / name)
            entry["filename"] = name

    message = karpathy_with(raw, tmp_path, renamed)
    assert "0042.jpg" in message and "42.jpg" in message and "image id 42" in message, message
    assert "rename" in message, message


def test_checkpoint_of_another_model_is_named_before_any_work(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as excinfo:
        evaluate(config("evaluate", "model=vit_b32", f"ckpt_path={trained}", f"output_dir={tmp_path / 'e'}"))
    assert "holds a 'agree-tiny' model" in one_line(excinfo) and "model.name=agree-tiny" in str(excinfo.value)
    assert not (tmp_path / "data").exists() and not (tmp_path / "e").exists()


def test_checkpoint_on_other_data_needs_ckpt_data_any(trained, release, tmp_path):
    other = tmp_path / "copy"
    shutil.copytree(release, other)
    overrides = ["data=flickr30k", f"data.root={other}", f"ckpt_path={trained}", "rerank=tbr"]
    with pytest.raises(ConfigError) as excinfo:
        evaluate(config("evaluate", *overrides, f"output_dir={tmp_path / 'refused'}"))
    message = one_line(excinfo)
    assert f"data.root={release} (64-px images)" in message and f"data.root={other}" in message, message
    assert not (tmp_path / "refused").exists()
    results = evaluate(config("evaluate", *overrides, "ckpt_data=any", f"output_dir={tmp_path / 'any'}"))
    assert list(stage_results(results)) == ["raw", "tbr"]


# ---------------------------------------------------------------------------------------------
# row 13: one name for a stage everywhere


def test_tbr_on_the_egr_lists_is_egr_tbr_in_results_predictions_console_and_report(
    trained, release, tmp_path
):
    out = tmp_path / "eval"
    overrides = ["data=flickr30k", f"data.root={release}", f"ckpt_path={trained}", "rerank=egr_tbr"]
    results = evaluate(config("evaluate", *overrides, f"output_dir={out}"))
    assert list(stage_results(results)) == ["raw", "egr", "egr_tbr"]
    assert list(stage_results(json.loads((out / "results.json").read_text()))) == ["raw", "egr", "egr_tbr"]
    assert (out / "predictions" / "egr_tbr_text_to_image.jsonl").is_file()
    assert (out / "evaluation" / "egr_tbr_image_to_text.json").is_file()
    *recall_rows, probe_row = format_table(results).splitlines()[1:]
    assert [line.split()[0] for line in recall_rows] == ["raw", "raw", "egr", "egr", "egr_tbr", "egr_tbr"]
    assert probe_row.startswith("binding probe: swap accuracy"), probe_row
    page = write_report(out, queries=1).read_text()
    assert page.count("<tr><td>EGR + TBR</td>") == 2


# ---------------------------------------------------------------------------------------------
# rows 4 and 5: images prepared for another model; prepare takes agree.train's model presets


def test_karpathy_records_what_its_images_were_made_for(prepared):
    made = json.loads((prepared / "annotation" / "flickr30k_images_preprocessing.json").read_text())
    assert made["model"] == "agree-tiny" and made["pretrained"] is None and made["image_size"] == 64
    assert made["mean"] == pytest.approx(OPENAI_MEAN) and made["std"] == pytest.approx(OPENAI_STD)


def test_model_presets_of_training_name_the_preprocessing():
    options = karpathy_step.Config(karpathy="k.json", images="i", root="r", model="scenes_pretrained")
    name, weights, size = options.model_keys()
    assert (name, size) == ("agree-tiny", 64) and weights.endswith("scenes_pretrained.safetensors")
    vit = karpathy_step.Config(karpathy="k.json", images="i", root="r", model="vit_l14").model_keys()
    assert vit == ("ViT-L-14-quickgelu", "openai", None)
    clash = karpathy_step.Config(karpathy="k.json", images="i", root="r", model="tiny", pretrained="x.pt")
    with pytest.raises(ConfigError, match="model=tiny is a preset .* give model=agree-tiny pretrained=x.pt"):
        clash.model_keys()


@pytest.fixture(scope="module")
def prepared_224(raw, tmp_path_factory):
    """``karpathy`` with its defaults: ViT-L/14's preprocessing, 224 px."""
    source, images = raw
    root = tmp_path_factory.mktemp("prepared_224") / "flickr30k"
    assert prepare(["karpathy", f"karpathy={source}", f"images={images}", f"root={root}"]) == 0
    return root


@pytest.mark.parametrize("record", [True, False], ids=["recorded", "release files"])
def test_images_of_another_size_stop_before_training_naming_the_prepare_command(
    prepared_224, tmp_path, record
):
    root = tmp_path / "flickr30k"
    shutil.copytree(prepared_224, root)
    if not record:  # the release's own files carry no record: the first array's size is read
        (root / "annotation" / "flickr30k_images_preprocessing.json").unlink()
    for command, overrides in (
        (train, train_overrides(root, tmp_path / "run", "model=tiny")),
        (evaluate, ["data=flickr30k", f"data.root={root}", f"output_dir={tmp_path / 'run'}"]),
    ):
        with pytest.raises(ConfigError) as excinfo:
            command(config(command.__name__, *overrides))
        message = one_line(excinfo)
        assert "its npz images are 224 px" in message and "model.name=agree-tiny takes 64 px" in message, (
            message
        )
        assert "python -m agree.prepare karpathy" in message and "model=agree-tiny pretrained=null" in message
        assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# rows 6-8, 10-12: each error names the file, key or value and says what to do


def test_egr_without_test_entities_names_the_entities_command(prepared, tmp_path):
    overrides = ["data=flickr30k", f"data.root={prepared}", "rerank=egr_tbr", f"output_dir={tmp_path / 'e'}"]
    with pytest.raises(ConfigError) as excinfo:
        evaluate(config("evaluate", *overrides))
    message = one_line(excinfo)
    annotation = prepared / "annotation"
    command = (
        f"python -m agree.prepare entities input={annotation / 'flickr30k_test_texts.jsonl'} "
        f"output={annotation / 'flickr30k_test_texts_segs.jsonl'}"
    )
    assert command in message and "rerank=tbr" in message, message


@pytest.mark.parametrize("command", [train, evaluate])
def test_a_release_folder_without_its_data_group_says_add_data_flickr30k(prepared, tmp_path, command):
    cfg = config(command.__name__, f"data.root={prepared}", f"output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError) as excinfo:
        command(cfg)
    message = one_line(excinfo)
    assert f"data.root={prepared}: a release folder" in message and "add data=flickr30k" in message, message
    assert sorted(p.name for p in prepared.iterdir()) == ["annotation"]  # nothing generated into it


def test_entities_on_the_val_json_says_which_files_it_reads(prepared, capsys):
    val = prepared / "annotation" / "flickr30k_val.json"
    assert prepare(["entities", f"input={val}"]) == 1
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and f"input={val}: a JSON list" in message, message
    assert "_train_pred.jsonl" in message and "_test_texts.jsonl" in message, message


def test_prepare_user_errors_exit_with_1_as_every_command(raw, tmp_path, capsys):
    source, images = raw
    argv = ["karpathy", f"karpathy={source}", f"images={images}", f"root={tmp_path / 'out'}", "colour=red"]
    assert prepare(argv) == 1
    assert "unknown key 'colour'" in capsys.readouterr().err
    assert prepare(["karpathi"]) == 1


def test_default_detector_offline_is_one_line_at_once(release, raw, tmp_path):
    """Without HF_HUB_OFFLINE and without the hub, ``transformers`` retried for minutes."""
    pytest.importorskip("transformers", reason="the prepare extra is not installed")
    root = tmp_path / "flickr30k"
    shutil.copytree(release, root)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    argv = [sys.executable, "-m", "agree.prepare", "ground", f"root={root}", f"images={raw[1]}", "model=tiny"]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    seconds = time.perf_counter() - start
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and "Retrying" not in done.stderr, done.stderr
    assert "detector=google/owlv2-base-patch16-ensemble: not in the local Hugging Face cache" in done.stderr
    assert "set detector=<a local folder holding the model>" in done.stderr, done.stderr
    print(f"offline detector error after {seconds:.1f} s")


def test_missing_vg_images_name_their_folder(tmp_path):
    objects, _ = vg_raw(tmp_path / "vg", image_ids=[1, 2, 3])
    regions = vg_step.read_objects(objects, 3)
    word = sorted(regions)[0]
    with pytest.raises(DataFormatError) as excinfo:
        vg_step.bank_items(regions, [word], 1, {}, tmp_path / "VG_100K")
    message = one_line(excinfo)
    assert f"{tmp_path / 'VG_100K'}: VG image" in message and "set images=" in message, message


# ---------------------------------------------------------------------------------------------
# row 14: the documentation of data preparation


def test_every_prepare_key_is_documented_with_its_steps():
    """Each step's keys (``--help``) are in docs/data-preparation.md's key table, on a row naming the step."""
    rows = [
        line.split("|")[1:3]
        for line in (REPO / "docs" / "data-preparation.md").read_text().splitlines()
        if line.startswith("| `")
    ]
    documented = {
        (key, step)
        for keys, steps in rows
        for key in re.findall(r"`([a-z_]+)`", keys)
        for step in re.findall(r"[a-z-]+", steps)
    }
    for step, name in STEPS.items():
        for field in dataclasses.fields(importlib.import_module(name).Config):
            assert (field.name, step) in documented or (field.name, "all") in documented, (field.name, step)
