"""Every key of the schema is refused when it is out of range or of the wrong type, in one line naming
it: the keys are walked from ``agree.schema``, so a new key fails ``test_every_key_is_listed`` until
it gets an out-of-range value below (or a line saying why any value is accepted)."""

import dataclasses
import re
import typing
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from agree.errors import ConfigError
from agree.schema import EvaluateConfig, TrainConfig
from agree.settings import evaluate_settings, train_settings

from .test_config_errors import config
from .test_config_schema import no_model  # noqa: F401  (a fixture)

SYNTHETIC_COUNTS = [f"data.synthetic.{k}" for k in ("train_images", "val_images", "test_images")]
SYNTHETIC_COUNTS += ["data.synthetic.captions_per_image", "data.synthetic.min_objects"]
MODEL = {
    "model.name": ["ViT-Nope"],
    "model.pretrained": ["laion9b", "weights/missing.pt"],
    "model.image_size": [32],
}
DATA = {
    "data.kind": ["imagenet"],
    "data.max_entities": [0],
    "data.max_entity_words": [0],
    "data.num_workers": [-1],
    **{key: [0] for key in SYNTHETIC_COUNTS},
}
# Out-of-range values of each checked key, per command.
TRAIN_REFUSED: dict[str, list] = {
    "ckpt_path": ["nowhere/last.ckpt", "last"],
    "drop_loss": ["nope"],
    **MODEL,
    **DATA,
    "data.batch_size": [0],
    "data.val_batch_size": [0],
    "data.global_batch_size": [0],
    "data.fallback_mask": ["white"],
    "losses": [{"clip": -1.0}, {"clip": 0.0}, {"colour": 1.0}],
    "optim.lr": [0.0],
    "optim.weight_decay": [-0.1],
    "optim.betas": [[0.9], [0.9, 1.0], [-0.1, 0.9]],
    "optim.eps": [0.0],
    "optim.warmup_steps": [-1],
    "optim.schedule_epochs": [0],
    "checkpoint.every_n_train_steps": [0],
    "trainer.accelerator": ["gpu", "cuda"],  # on a machine without CUDA (patched below)
    "trainer.num_nodes": [0],
    "trainer.max_epochs": [0, -2],
    "trainer.max_steps": [0, -2],
    "trainer.accumulate_grad_batches": [0],
    "trainer.log_every_n_steps": [0],
    "trainer.gradient_clip_val": [-1.0],
    "trainer.deterministic": ["sometimes"],
    "trainer.fast_dev_run": [-1, "yes"],
    "trainer.limit_train_batches": [-1, "all"],
    "trainer.limit_val_batches": [-1],
    "trainer.overfit_batches": [-0.5],
    "trainer.val_check_interval": [-1],
    "trainer.extra": [{"nope": 1}, {"max_epochs": 3}],
    "optim.max_logit_scale": [0.0],
    "loss_options.ddp_gradient": ["mean"],
    "loss_options.margin_reduction": ["max"],
    "data.synthetic.regime": ["mixed"],
}
EVALUATE_REFUSED: dict[str, list] = {
    "ckpt_path": ["nowhere/last.ckpt"],
    "batch_size": [0],
    "devices": [0],
    "device": ["fast"],
    **MODEL,
    **DATA,
    "rerank.stages": [["tbr", "bm25"]],
    "rerank.k": [0],
    "rerank.absent_rank": [5],  # below rerank.k
    "rerank.depth": [0],
    "rerank.max_entities": [0],
    "rerank.max_entity_words": [0],
    **{f"annotations.{key}": ["nowhere.jsonl"] for key in ("images", "texts", "text_segs")},
    **{
        f"features.{key}": ["nowhere.jsonl"]
        for key in ("image_jsonl", "text_jsonl", "prompt_jsonl", "mask_jsonl")
    },
    "cache_max_gb": [0.0],
    "ckpt_data": ["other"],
    "data.synthetic.regime": ["mixed"],
    "features.precision": ["fp8"],
    "features.masked_text_source": ["captions"],
    "features.caption_entities": ["by_name"],
    "features.gallery_order": ["random"],
    "rerank.accumulate": ["float16"],
}
# Keys whose every value of the right type is accepted here, and why.
BY_LIGHTNING = "a lightning.Trainer argument that Lightning checks itself"
SCENES = "a parameter of the generated scenes, as SceneConfig takes it"
BOTH_UNCHECKED = {
    "seed": "any integer",
    "output_dir": "the run's own folder",
    "method": "the method group's option (Hydra refuses another)",
    "model.mean": "any normalisation",
    "model.std": "any normalisation",
    "data.prefix": "the release's file-name prefix (flickr30k, coco, ...); a missing file is named",
    "data.root": "a folder, checked on disk (tests/test_config_errors.py, tests/test_inputs_read_only.py)",
    "data.vg_root": "a folder, checked on disk with the VG losses (tests/test_config_errors.py)",
    "data.image_size": "${model.image_size}",
    "data.mean": "${model.mean}",
    "data.std": "${model.std}",
    **{
        f"data.synthetic.{key}": SCENES
        for key in (
            "seed",
            "image_size",
            "max_objects",
            "attributes",
            "binding_variants",
            "vg_images_per_word",
            "noise",
            "mean",
            "std",
        )
    },
}
TRAIN_UNCHECKED = {
    **BOTH_UNCHECKED,
    "optimized_metric": "the metric main() returns to a sweeper",
    "gpu_precision": BY_LIGHTNING,
    "loss_options.margin": "any margin (the release's is 0)",
    "logger": "built from its _target_",
    "callbacks": "each built from its _target_",
    **{
        f"trainer.{key}": BY_LIGHTNING
        for key in (
            "devices",
            "strategy",
            "precision",
            "check_val_every_n_epoch",
            "num_sanity_val_steps",
            "profiler",
        )
    },
}
EVALUATE_UNCHECKED = {
    **BOTH_UNCHECKED,
    "cache_dir": "a folder; unwritable: no cache, one line (tests/test_feature_cache.py)",
    **{
        f"data.{key}": "read by training only"
        for key in ("batch_size", "val_batch_size", "global_batch_size")
    },
    "data.fallback_mask": "read by training only",
    **{
        f"rerank.{d}.{w}": "an EGR weight: any real number"
        for d in ("text_to_image", "image_to_text")
        for w in ("raw_weight", "mask_weight", "base_weight", "prompt_weight")
    },  # fmt: skip
}
COMMANDS = {
    "train": (TrainConfig, TRAIN_REFUSED, TRAIN_UNCHECKED),
    "evaluate": (EvaluateConfig, EVALUATE_REFUSED, EVALUATE_UNCHECKED),
}


def leaves(schema: type, prefix: str = "") -> dict[str, Any]:
    """Every leaf key of a schema dataclass (nested dataclasses walked) with its type."""
    found = {}
    for name, kind in typing.get_type_hints(schema).items():
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        node = inner[0] if typing.get_origin(kind) is typing.Union and len(inner) == 1 else kind
        if dataclasses.is_dataclass(node):
            found.update(leaves(node, f"{prefix}{name}."))
        else:
            found[f"{prefix}{name}"] = node
    return found


def wrong_type(kind: Any) -> Any:
    """A value of another type than ``kind`` (None where OmegaConf takes any value: str, Any)."""
    origin = typing.get_origin(kind)
    if kind in (int, float):
        return "abc"
    if kind is bool:
        return "maybe"
    if origin in (list, tuple):
        return ["abc"]
    if origin is dict and typing.get_args(kind)[1] is not Any:
        return {"clip": "abc"}
    return None


def set_key(cfg, key: str, value):
    cfg = cfg.copy()
    with open_dict(cfg):
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """The train and evaluate configs every case starts from (scenes under a new folder)."""
    tmp = tmp_path_factory.mktemp("ranges")
    where = [f"output_dir={tmp / 'run'}", f"data.root={tmp / 'scenes'}"]
    return {
        "train": config("train", "+experiment=demo", *where),
        "evaluate": config("evaluate", *where),
    }


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def refused_with_its_key(command: str, cfg, key: str) -> None:
    run = train_settings if command == "train" else evaluate_settings
    with pytest.raises(ConfigError) as excinfo:
        run(cfg)
    message = str(excinfo.value)
    assert "\n" not in message
    assert re.search(rf"(^|[^\w.]){re.escape(key)}\b", message), message


@pytest.mark.parametrize("command", COMMANDS)
def test_every_key_is_listed(command):
    """Each non-boolean key has out-of-range values or a reason to take any value; no stale entries."""
    schema, refused, unchecked = COMMANDS[command]
    keys = {key for key, kind in leaves(schema).items() if kind is not bool}
    assert not refused.keys() & unchecked.keys()
    assert sorted(keys - refused.keys() - unchecked.keys()) == [], "a key without a range test"
    assert sorted((refused.keys() | unchecked.keys()) - keys) == [], "a listed key the schema lacks"


@pytest.mark.parametrize(
    "command, key, value",
    [
        (command, key, value)
        for command, (_, refused, _) in COMMANDS.items()
        for key, values in refused.items()
        for value in values
    ],  # fmt: skip
)
def test_out_of_range_value_is_refused_naming_its_key(composed, no_model, no_cuda, command, key, value):  # noqa: F811
    refused_with_its_key(command, set_key(composed[command], key, value), key)


@pytest.mark.parametrize(
    "command, key, value",
    [
        (command, key, wrong_type(kind))
        for command, (schema, _, _) in COMMANDS.items()
        for key, kind in leaves(schema).items()
        if wrong_type(kind) is not None
    ],  # fmt: skip
)
def test_value_of_the_wrong_type_is_refused_naming_its_key(composed, no_model, command, key, value):  # noqa: F811
    refused_with_its_key(command, set_key(composed[command], key, value), key)
