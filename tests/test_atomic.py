"""No torn files: a writer killed mid-write leaves the old file (or the new one), never a partial one."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agree import atomic
from agree.train import AtomicCheckpointIO, train

from .conftest import SUBPROCESS_LIMIT

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def temps(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=ENV)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = SUBPROCESS_LIMIT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the writer did not get going"
        time.sleep(0.01)


def sigkill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=SUBPROCESS_LIMIT) == -signal.SIGKILL


def test_sigkill_during_write_jsonl_keeps_the_old_file(tmp_path):
    target, ready = tmp_path / "predictions.jsonl", tmp_path / "ready"
    atomic.write_jsonl(target, [{"query_id": 1, "item_ids": [1, 2]}])
    old = target.read_bytes()
    writer = spawn(f"""
        import time
        from pathlib import Path
        from agree.atomic import write_jsonl

        def rows():
            for i in range(100):  # 6 MB reach the temporary file, then the writer stalls
                yield {{"query_id": i, "item_ids": list(range(10_000))}}
            Path({str(ready)!r}).touch()
            time.sleep(600)
            yield {{"query_id": -1, "item_ids": []}}

        write_jsonl({str(target)!r}, rows())
    """)
    try:
        wait_for(ready, writer)
        (partial,) = temps(target)
        assert partial.stat().st_size > 1_000_000  # a partial file exists, under a hidden temporary name
        sigkill(writer)
    finally:
        writer.kill()
    assert target.read_bytes() == old
    assert temps(target) == [partial]  # recognisable: .predictions.jsonl.<host>.<pid>.<random>.tmp
    assert partial.name.startswith(f".predictions.jsonl.{atomic.HOST}.{writer.pid}.")

    atomic.write_jsonl(
        target, [{"query_id": 2, "item_ids": [3]}]
    )  # the next write clears the dead one's leftover
    assert target.read_text() == '{"query_id": 2, "item_ids": [3]}\n'
    assert temps(target) == []


@pytest.mark.parametrize("writer, attempts", [("write_npz", 4), ("write_torch", 2)])  # torch: 2 s to import
def test_sigkill_at_random_moments_never_leaves_a_partial_file(tmp_path, writer, attempts):
    """A process rewrites a 16 MB file in a loop (each version a constant array); killed at random
    moments, mostly mid-write, the file always loads completely, as one whole version."""
    target, started = tmp_path / f"data.{writer}", tmp_path / "started"
    shape, rng, mid_write = (4, 1024, 1024), random.Random(0), 0
    for attempt in range(3 * attempts):
        started.unlink(missing_ok=True)
        process = spawn(f"""
            from pathlib import Path
            import numpy as np
            from agree import atomic

            for version in range(1, 10_000):
                array = np.full({shape}, {attempt * 10_000} + version, dtype=np.float32)
                if {writer!r} == "write_npz":
                    atomic.write_npz({str(target)!r}, {{"a": array}})
                else:
                    import torch

                    atomic.write_torch({str(target)!r}, {{"a": torch.from_numpy(array)}})
                Path({str(started)!r}).touch()
        """)
        try:
            wait_for(started, process)
            time.sleep(rng.uniform(0.0, 0.3))
            sigkill(process)
        finally:
            process.kill()
        if writer == "write_npz":
            with np.load(target, allow_pickle=False) as npz:
                array = npz["a"]
        else:
            array = torch.load(target, weights_only=True)["a"].numpy()
        assert array.shape == shape and (array == array.flat[0]).all()
        assert len(temps(target)) <= 1  # at most the killed write's own temporary file
        mid_write += len(temps(target))
        if attempt + 1 >= attempts and mid_write:
            break  # a kill between two writes proves less: a few more tries, until one lands mid-write
    assert mid_write  # some kill did interrupt a write


def test_a_failing_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    atomic.write_json(target, {"r1": 1})

    def rows():
        yield {"a": 1}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic.write_jsonl(target, rows())
    assert target.read_text() == '{\n  "r1": 1\n}\n'
    assert temps(target) == []


def test_written_files_follow_the_umask_and_live_writers_temps_stay(tmp_path):
    target = tmp_path / "metrics.json"
    live = tmp_path / f".metrics.json.{atomic.HOST}.{os.getppid()}.abc123.tmp"  # a running process's write
    dead = tmp_path / f".metrics.json.{atomic.HOST}.999999999.abc123.tmp"
    live.touch()
    dead.touch()
    atomic.write_json(target, {})
    assert target.stat().st_mode & 0o777 == 0o666 & ~atomic.UMASK
    assert live.exists() and not dead.exists()


def test_lightning_checkpoints_go_through_a_temporary_file(tmp_path, monkeypatch):
    """Lightning's default writer stages checkpoints in the system temp folder and moves them
    (fsspec transaction: a copy across filesystems); AtomicCheckpointIO renames beside the target."""
    target = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint_io = AtomicCheckpointIO()
    checkpoint_io.save_checkpoint({"step": torch.tensor(1)}, target)

    def torn_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError("killed")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="killed"):
        checkpoint_io.save_checkpoint({"step": torch.tensor(2)}, target)
    assert checkpoint_io.load_checkpoint(target, weights_only=True)["step"] == 1
    assert temps(target) == []


def test_training_writes_every_checkpoint_by_a_rename_beside_it(tmp_path, monkeypatch):
    """agree.train's Trainer saves last.ckpt and best.ckpt through AtomicCheckpointIO: each is renamed
    into place from a temporary file in its own folder (Lightning's default moves one from /tmp)."""
    from .test_run_safety import tiny_train

    renames = []

    def recording(src, dst, *args, **kwargs):
        renames.append((Path(src), Path(dst)))
        return real(src, dst, *args, **kwargs)

    real = os.replace
    monkeypatch.setattr(os, "replace", recording)
    out = tmp_path / "run"
    train(tiny_train(out, tmp_path / "scenes"))
    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]
    for path in folder.iterdir():
        assert any(
            dst == path and src.parent == folder and src.name.startswith(f".{path.name}.")
            for src, dst in renames
        ), path.name
