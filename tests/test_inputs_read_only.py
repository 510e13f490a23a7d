"""A user's data is read-only: no command writes into, replaces or deletes what the project did not
make; untrusted names, files and settings fail with one line before anything is written."""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from PIL import Image

from agree import demo
from agree.data.feature_files import read_feature_jsonl
from agree.data.synthetic import OWNER, SceneConfig, ensure_generated
from agree.errors import ConfigError, DataFormatError, FolderNotOwnedError
from agree.evaluate import evaluate
from agree.folders import MARKER, claim
from agree.prepare import karpathy as karpathy_step
from agree.prepare.__main__ import main as prepare
from agree.prepare.images import load_image
from agree.train import train

from .conftest import SUBPROCESS_LIMIT
from .test_prepare_steps import flickr_raw
from .test_progress_and_wandb import SCENES

REPO = Path(__file__).resolve().parents[1]


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (symlinks as their target's name)."""
    return {
        str(p.relative_to(folder)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


@pytest.fixture
def real(scenes, tmp_path):
    """A user's release folder (the scenes files, without the project's marker) and its bytes."""
    root = tmp_path / "REAL"
    shutil.copytree(scenes.root, root)
    (root / MARKER).unlink()
    return root, files(root)


def config(name: str, *overrides: str):
    with initialize_config_module("agree.conf", version_base="1.3"):
        return compose(name, list(overrides))


# ---------------------------------------------------------------------------------------------
# rows 1-4: data roots and folders


def test_an_experiment_setting_synthetic_keys_trains_on_the_real_data_unchanged(real, tmp_path):
    """Row 1: ``+experiment=ablation data=flickr30k data.root=REAL`` reads REAL; nothing is generated."""
    root, before = real
    cfg = config(
        "train",
        "+experiment=ablation",
        "data=flickr30k",
        f"data.root={root}",
        f"data.vg_root={root / 'VG'}",
        f"output_dir={tmp_path / 'run'}",
        "data.num_workers=0",
        "data.batch_size=8",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
    )
    assert cfg.data.synthetic.train_images == 400  # set by the experiment, ignored for data=flickr30k
    metrics, _ = train(cfg)
    assert metrics and files(root) == before


def test_evaluating_with_the_synthetic_group_refuses_a_user_folder(real, tmp_path):
    """Row 2: ``agree.evaluate data.root=REAL`` without ``data=flickr30k`` stops; REAL is unchanged."""
    root, before = real
    with pytest.raises(
        ConfigError, match="under data=synthetic, which generates scenes there: add data=flickr30k"
    ):
        evaluate(config("evaluate", f"data.root={root}", f"output_dir={tmp_path / 'out'}"))
    assert files(root) == before and not (tmp_path / "out").exists()


def test_the_generator_writes_only_into_a_new_empty_or_own_folder(scenes, tmp_path):
    """Row 2: a scenes folder of the same parameters is reused, one of other parameters refused."""
    small = SceneConfig(seed=3, train_images=60, val_images=12, test_images=20, vg_images_per_word=2)
    before = files(scenes.root)
    assert ensure_generated(scenes.root, small).root == scenes.root and files(scenes.root) == before
    with pytest.raises(FolderNotOwnedError, match="made by agree scenes with other settings"):
        ensure_generated(scenes.root, SceneConfig(seed=4))
    assert files(scenes.root) == before
    (tmp_path / "empty").mkdir()
    claimed = json.loads((ensure_generated(tmp_path / "empty", small).root / MARKER).read_text())
    assert claimed["owner"] == OWNER


def test_the_demo_refuses_a_folder_holding_a_users_files(tmp_path):
    """Row 3: ``agree.demo DIR`` with the user's ``DIR/train`` stops before deleting anything."""
    (tmp_path / "DIR" / "train").mkdir(parents=True)
    (tmp_path / "DIR" / "train" / "thesis.tex").write_text("years of work")
    before = files(tmp_path / "DIR")
    with pytest.raises(FolderNotOwnedError, match="not made by agree demo"):
        demo.run(tmp_path / "DIR", [])
    assert files(tmp_path / "DIR") == before


def test_make_clean_removes_only_what_the_demo_and_the_generator_made(tmp_path):
    """Row 4: training runs, evaluations, multiruns and the user's data survive ``make clean``."""
    kept = {
        "outputs/train/2026-01-01/10-00-00/checkpoints/last.ckpt": b"weights",
        "outputs/evaluate/2026-01-01/11-00-00/results.json": b"{}",
        "multirun/ablation/0/metrics.json": b"{}",
        "data/flickr30k/annotation/flickr30k_train_pred.jsonl": b"{}",
    }
    for name, content in kept.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    claim(tmp_path / "outputs" / "demo", "demo", contents=demo.CONTENTS)
    claim(tmp_path / "data" / "scenes-64px-seed0-train1200", OWNER, {"seed": 0}, ["annotation/*"])
    done = subprocess.run(
        ["make", "-s", "-f", str(REPO / "Makefile"), "clean", f"PY={sys.executable}"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_LIMIT,
    )
    assert done.returncode == 0, done.stderr
    assert files(tmp_path) == kept
    assert (
        not (tmp_path / "outputs" / "demo").exists()
        and not (tmp_path / "data" / "scenes-64px-seed0-train1200").exists()
    )


# ---------------------------------------------------------------------------------------------
# rows 11-15: data preparation and hostile files


def karpathy_config(source: Path, images: Path, root: Path, **extra) -> karpathy_step.Config:
    return karpathy_step.Config(
        karpathy=str(source), images=str(images), root=str(root), model="agree-tiny", pretrained=None, **extra
    )


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda d: d.update(dataset="../../../x"), "'dataset': ../../../x cannot be part of a file name"),
        (
            lambda d: d["images"][0].update(filename="../../secret.jpg"),
            "images[0]: ../../secret.jpg leaves the image folder",
        ),
        (lambda d: d["images"][1].update(filepath="/etc"), "images[1]: /etc/"),
    ],
)
def test_karpathy_names_cannot_leave_their_folders(tmp_path, edit, fragment):
    """Row 11: a ``dataset`` or ``filename`` with ``../`` fails before anything is written."""
    source, images = flickr_raw(tmp_path / "raw")
    (tmp_path / "secret.jpg").write_bytes((images / sorted(os.listdir(images))[0]).read_bytes())
    data = json.loads(source.read_text())
    edit(data)
    source.write_text(json.dumps(data))
    before = files(tmp_path)
    with pytest.raises(DataFormatError) as error:
        karpathy_step.run(karpathy_config(source, images, tmp_path / "work" / "deep" / "root"))
    assert fragment in str(error.value)
    assert files(tmp_path) == before and not (tmp_path / "work").exists()


def outputs(root: Path) -> dict[str, bytes]:
    """The files of ``root/annotation`` without the resumable work (``<output>.parts/``)."""
    return {k: v for k, v in files(root / "annotation").items() if ".parts/" not in k}


def test_karpathy_replaces_its_outputs_as_a_set(tmp_path, monkeypatch):
    """Row 12: killed right after the annotations are written, the previous files stay byte for byte;
    existing outputs (with segs and preds added since) are only replaced with overwrite=true."""
    source, images = flickr_raw(tmp_path / "raw")
    root = tmp_path / "release"
    karpathy_step.run(karpathy_config(source, images, root, shard_size=3))
    before = outputs(root)
    assert len(before) == 8  # the annotations, the npz and the record of their preprocessing

    data = json.loads(source.read_text())
    data["images"] = data["images"][1:] + data["images"][:1]  # other images at the train indices
    source.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="set overwrite=true"):
        karpathy_step.run(karpathy_config(source, images, root))
    assert outputs(root) == before

    def killed_after(*args):
        real_write(*args)
        raise KeyboardInterrupt

    real_write = karpathy_step.write_annotations
    monkeypatch.setattr(karpathy_step, "write_annotations", killed_after)
    with pytest.raises(KeyboardInterrupt):
        karpathy_step.run(karpathy_config(source, images, root, overwrite=True))
    assert outputs(root) == before
    monkeypatch.undo()
    karpathy_step.run(karpathy_config(source, images, root, overwrite=True))
    after = outputs(root)
    assert after.keys() == before.keys() and after != before
    assert sorted(p.name for p in root.iterdir()) == ["annotation"]  # no staging folder left


@pytest.fixture
def spacy_pipeline():
    pytest.importorskip("spacy", reason="the prepare extra is not installed")
    entities = pytest.importorskip("agree.prepare.entities")
    try:
        entities.load_pipeline("en_core_web_sm")
    except ConfigError as e:
        pytest.skip(str(e))


def train_lines(path: Path) -> Path:
    path.write_text(
        json.dumps({"image": "flickr30k-images/1.jpg", "caption": "Two dogs play .", "image_id": 0}) + "\n"
    )
    return path


def test_entities_in_place_keeps_the_mode_and_the_symlink(tmp_path, spacy_pipeline):
    """Row 13: a 0600 file stays 0600; a symlink stays a link, its target gets the segs."""
    private = train_lines(tmp_path / "private.jsonl")
    private.chmod(0o600)
    (tmp_path / "store").mkdir()
    target = train_lines(tmp_path / "store" / "train.jsonl")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    for path in (private, link):
        assert prepare(["entities", f"input={path}"]) == 0
    assert (private.stat().st_mode & 0o777) == 0o600 and "segs" in private.read_text()
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text())["segs"] == ["two dogs"]


def test_entities_batch_size_0_is_a_config_error(tmp_path, spacy_pipeline, capsys):
    """Row 14: refused before any shard is written; the next run with a valid size works."""
    path = train_lines(tmp_path / "train.jsonl")
    assert prepare(["entities", f"input={path}", "batch_size=0"]) == 1
    assert capsys.readouterr().err == "error: batch_size=0: must be at least 1\n"
    assert not (tmp_path / "train.jsonl.parts").exists()
    assert prepare(["entities", f"input={path}", "batch_size=2"]) == 0


def test_a_lone_surrogate_id_fails_before_any_output(scenes, tmp_path):
    """Row 15: ``"\\ud800x"`` as an id is refused by the reader, and nothing (no features/) is written."""
    images, texts = tmp_path / "images.jsonl", tmp_path / "texts.jsonl"
    images.write_text('{"image_id": "1", "feature": [1, 0]}\n{"image_id": "\\ud800x", "feature": [0, 1]}\n')
    texts.write_text('{"query_id": 0, "feature": [1, 0]}\n')
    with pytest.raises(DataFormatError, match=r"images.jsonl:2: 'image_id' '\\ud800x' is not valid Unicode"):
        read_feature_jsonl(images, "image_id")
    (tmp_path / "ann_images.jsonl").write_text('{"image_id": 1, "item_ids": [0]}\n')
    (tmp_path / "ann_texts.jsonl").write_text('{"query_id": 0, "query_text": "a", "item_ids": [1]}\n')
    cfg = config(
        "evaluate",
        f"features.image_jsonl={images}",
        f"features.text_jsonl={texts}",
        f"annotations.images={tmp_path / 'ann_images.jsonl'}",
        f"annotations.texts={tmp_path / 'ann_texts.jsonl'}",
        f"output_dir={tmp_path / 'out'}",
    )
    with pytest.raises(DataFormatError, match="not valid Unicode"):
        evaluate(cfg)
    assert not (tmp_path / "out").exists()  # the folder it made, holding nothing but its claim, is removed


def test_entities_with_a_bad_utf8_first_line_fails_in_one_line(tmp_path, capsys):
    """Row 15: one line naming the file and line, not a UnicodeDecodeError traceback."""
    path = tmp_path / "train.jsonl"
    line = b'{"caption": "caf\xe9"}\n'
    path.write_bytes(line)
    assert prepare(["entities", f"input={path}"]) == 1
    at = line.index(b"\xe9")
    assert capsys.readouterr().err == f"error: {path}:1: not UTF-8 text (invalid byte at position {at})\n"


def png_of_size(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape, 70 bytes)."""
    Image.new("1", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = struct.pack(">II", width, height) + data[24:29]
    data[16:33] = ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("side", [14000, 10000])  # above Pillow's own error limit, and between
def test_huge_images_are_refused_before_decoding(tmp_path, side):
    """Row 15: a 14000² PNG gives a one-line DataFormatError naming the file, not a traceback."""
    path = png_of_size(tmp_path / "bomb.png", side, side)
    with pytest.raises(DataFormatError, match=f"{path}: .*(exceeds limit|more than the limit)"):
        load_image(path)


def test_the_demo_and_generator_commands_refuse_in_one_line(tmp_path, monkeypatch):
    """``python -m agree.demo output_dir=DIR`` and ``python -m agree.data.synthetic root=DIR`` on a user's
    folder: one line (no traceback), nothing changed."""
    from agree.data import synthetic

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    (tmp_path / "DIR").mkdir()
    (tmp_path / "DIR" / "notes.txt").write_text("mine")
    before = files(tmp_path / "DIR")
    for command, key in ((demo.main, "output_dir"), (synthetic.main, "root")):
        with pytest.raises(SystemExit) as stop:
            command([f"{key}={tmp_path / 'DIR'}"])
        message = str(stop.value)
        assert message.startswith("error: ") and "\n" not in message and "not made by agree" in message
    assert files(tmp_path / "DIR") == before


def test_the_study_works_only_in_its_own_folder(tmp_path, monkeypatch):
    """``agree.study output_dir=DIR`` clears its run folders on a rerun, so a user's DIR is refused first."""
    from agree import study

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    (tmp_path / "DIR" / "seed0").mkdir(parents=True)
    (tmp_path / "DIR" / "seed0" / "results.csv").write_text("mine")
    before = files(tmp_path / "DIR")
    with pytest.raises(SystemExit, match="^error: .*not made by agree study"):
        study.main([f"output_dir={tmp_path / 'DIR'}", f"doc={tmp_path / 'page.md'}", "seeds=[0]"])
    assert files(tmp_path / "DIR") == before and not (tmp_path / "page.md").exists()


def test_an_evaluation_never_replaces_a_users_entries(scenes, tmp_path):
    """``output_dir`` naming a folder with the user's ``features/``, or with any file of the user's:
    refused before any work, unchanged (issue 20, row 1: a folder is ours only if we made it); a
    rerun into its own folder replaces its set."""
    overrides = [f"data.root={scenes.root}", *SCENES]
    with initialize_config_module("agree.conf", version_base="1.3"):
        for name, entry in (("mine", "features/thesis.npy"), ("shared", "notes.txt")):
            user = tmp_path / name
            (user / entry).parent.mkdir(parents=True, exist_ok=True)
            (user / entry).write_bytes(b"years of work")
            before = files(user)
            with pytest.raises(FolderNotOwnedError, match="not empty and not made by agree evaluate"):
                evaluate(compose("evaluate", [f"output_dir={user}", *overrides]))
            assert files(user) == before
        own = tmp_path / "own"
        for _ in range(2):  # the second run replaces the first one's set
            evaluate(compose("evaluate", [f"output_dir={own}", *overrides]))
    assert (own / "results.json").is_file()


def test_a_failed_evaluation_keeps_an_empty_folder_the_user_gave(tmp_path):
    """A folder that existed before the command (empty, so it could be claimed) is never removed when
    the command fails; only a folder the command made itself goes (``runfolder._remove_if_bare``)."""
    images, texts = tmp_path / "images.jsonl", tmp_path / "texts.jsonl"
    images.write_text('{"image_id": "1", "feature": [1, 0]}\n{"image_id": "\\ud800x", "feature": [0, 1]}\n')
    texts.write_text('{"query_id": 0, "feature": [1, 0]}\n')
    (tmp_path / "ann_images.jsonl").write_text('{"image_id": 1, "item_ids": [0]}\n')
    (tmp_path / "ann_texts.jsonl").write_text('{"query_id": 0, "query_text": "a", "item_ids": [1]}\n')
    mine = tmp_path / "mine"
    mine.mkdir()
    cfg = config(
        "evaluate",
        f"features.image_jsonl={images}",
        f"features.text_jsonl={texts}",
        f"annotations.images={tmp_path / 'ann_images.jsonl'}",
        f"annotations.texts={tmp_path / 'ann_texts.jsonl'}",
        f"output_dir={mine}",
    )
    with pytest.raises(DataFormatError, match="not valid Unicode"):
        evaluate(cfg)
    assert mine.is_dir()
