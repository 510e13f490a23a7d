"""One table of the losses: the ablation sweep and the weight presets list exactly its losses."""

from pathlib import Path

from omegaconf import OmegaConf

from agree.config import loss_weights_preset
from agree.model.registry import LOSSES, PAPER_LOSSES, inputs_for

CONF = Path(__file__).resolve().parents[1] / "agree" / "conf"


def test_the_ablation_sweeps_every_loss_of_the_registry():
    sweep = OmegaConf.load(CONF / "experiment" / "ablation.yaml").hydra.sweeper.params.drop_loss
    assert sweep.split(",") == ["none", *PAPER_LOSSES]


def test_the_agree_preset_turns_on_the_papers_losses_and_clip_the_contrastive_one():
    on = {
        preset: [k for k, w in loss_weights_preset(preset).items() if w > 0] for preset in ("clip", "agree")
    }
    assert on == {"clip": ["clip"], "agree": list(PAPER_LOSSES)}
    assert set(LOSSES) - set(PAPER_LOSSES) == {"swap_negatives"}  # beyond the paper, off in both


def test_every_weight_preset_weighs_the_registry_losses():
    for preset in ("clip", "agree"):
        assert list(loss_weights_preset(preset)) == list(LOSSES)


def test_inputs_follow_the_enabled_losses():
    assert inputs_for({"clip": 1.0, "vg_mask": 0.0}) == frozenset()
    assert inputs_for({"vg_mask": 0.1, "prompt": 1}) == {"vg", "vg_masked", "prompts"}
