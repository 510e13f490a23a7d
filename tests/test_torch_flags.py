"""Global torch flags (TF32, determinism) hold for one training or evaluation and are restored after
it, so an evaluation after a training in one process (demo, study) runs as a standalone one."""

import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_module

import agree.evaluate
import agree.train
from agree.config import allow_tf32, torch_flags
from agree.evaluate import evaluate
from agree.model.module import AgreeModule
from agree.train import train

SCENES = [
    "data.synthetic.train_images=16",
    "data.synthetic.val_images=8",
    "data.synthetic.test_images=12",
    "data.synthetic.vg_images_per_word=1",
]


def flags() -> dict:
    b = torch.backends
    return {
        "matmul": torch.get_float32_matmul_precision(),
        "conv": b.cudnn.conv.fp32_precision if hasattr(b.cudnn, "conv") else b.cudnn.allow_tf32,
        "benchmark": b.cudnn.benchmark,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }


@pytest.fixture
def gpu_present(monkeypatch):
    """``allow_tf32`` acts only where a GPU is present (nothing here runs on one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def with_a_gpu(enabled: bool) -> None:
    """``allow_tf32`` as on a machine with a GPU; the rest of the training stays on the CPU's paths."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        allow_tf32(enabled)


def test_flags_changed_in_the_block_are_restored(gpu_present):
    before = flags()
    with torch_flags():
        allow_tf32(True)
        assert torch.get_float32_matmul_precision() == "high"
        allow_tf32(False)  # turns TF32 off again, not nothing
        assert torch.get_float32_matmul_precision() == "highest"
        allow_tf32(True)
        torch.backends.cudnn.benchmark = True
        torch.use_deterministic_algorithms(True, warn_only=True)
        assert flags() != before
    assert flags() == before
    with pytest.raises(RuntimeError, match="stop"), torch_flags():
        allow_tf32(True)
        raise RuntimeError("stop")
    assert flags() == before


def test_an_evaluation_after_a_training_runs_as_a_standalone_one(monkeypatch, tmp_path):
    seen = {"train": [], "evaluate": []}
    rank_and_score, training_step = agree.evaluate.rank_and_score, AgreeModule.training_step

    def ranked(*args):
        seen["evaluate"].append(flags())
        return rank_and_score(*args)

    def step(self, *args):
        seen["train"].append(flags())
        return training_step(self, *args)

    monkeypatch.setattr(agree.evaluate, "rank_and_score", ranked)
    monkeypatch.setattr(AgreeModule, "training_step", step)
    monkeypatch.setattr(agree.train, "allow_tf32", with_a_gpu)
    data = [f"data.root={tmp_path / 'scenes'}", *SCENES]
    with initialize_config_module("agree.conf", version_base="1.3"):
        evaluation = compose("evaluate", [f"output_dir={tmp_path / 'eval'}", "device=cpu", *data])
        training = compose(
            "train",
            ["+experiment=demo", f"output_dir={tmp_path / 'train'}", *data, "tf32=true"]
            + ["trainer.max_steps=2", "trainer.deterministic=true", "trainer.enable_progress_bar=false"],
        )
    before = flags()
    evaluate(evaluation)
    train(training)
    evaluate(evaluation)
    assert before["matmul"] == "highest" and not before["deterministic"]
    assert seen["train"][0] == {**before, "matmul": "high", "deterministic": True}
    assert seen["evaluate"] == [before, before] and flags() == before


def test_a_block_that_leaves_determinism_alone_does_not_load_the_compiler():
    """Restoring an unchanged determinism flag is skipped: ``torch.use_deterministic_algorithms``
    imports torch's compiler stack (1.4 s of every evaluation on 2 CPU cores)."""
    code = (
        "import sys\nfrom agree.config import torch_flags\nwith torch_flags():\n    pass\n"
        "assert 'torch._inductor' not in sys.modules, 'the compiler was loaded'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
