"""The schema of ``agree.train``'s and ``agree.evaluate``'s configs: every key, with its type.

The YAML tree under ``agree/conf`` gives the values; ``agree.settings`` merges the composed config
into these dataclasses (``OmegaConf.structured``), so a key missing here is refused (``+foo=1``)
and a value of the wrong type (``optim.lr=fast``) is named in one line, before any work. Ranges,
files and the values derived from them are checked in ``agree.settings``.

``trainer`` keeps the ``lightning.Trainer`` arguments the configs use, typed; any other Trainer
argument goes under ``trainer.extra`` (``+trainer.extra.benchmark=true``), checked by name against
``lightning.Trainer``'s signature.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from agree.data.synthetic import SceneConfig

# SceneConfig is frozen, which OmegaConf makes read-only: the schema holds a mutable copy of its
# fields (same names, types and defaults), so the generator's parameters are declared once.
_scene_types = typing.get_type_hints(SceneConfig)
SyntheticConfig = dataclasses.make_dataclass(
    "SyntheticConfig",
    [(f.name, _scene_types[f.name], field(default=f.default)) for f in dataclasses.fields(SceneConfig)],
)

# OmegaConf reads these annotations at run time: ``Optional[...]``, not ``X | None`` (Python 3.10 too)
# ruff: noqa: UP006, UP007, UP045


@dataclass
class ModelConfig:
    name: str = MISSING  # an open_clip architecture
    pretrained: Optional[str] = None  # an open_clip tag, a weights file or an agree .ckpt
    image_size: Optional[int] = None  # null: the architecture's own
    mean: Optional[list[float]] = None  # null: those of name + pretrained tag
    std: Optional[list[float]] = None
    grad_checkpointing: bool = False
    compile: bool = False


@dataclass
class DataConfig:
    kind: str = MISSING  # scenes | release: set by the data group
    root: str = MISSING
    prefix: str = "flickr30k"  # of the release's file names (agree.prepare's prefix: coco, ...)
    vg_root: str = MISSING
    image_size: Optional[int] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    batch_size: int = 32
    val_batch_size: int = 64
    global_batch_size: Optional[int] = None
    max_entities: int = 5
    max_entity_words: Optional[int] = 7
    num_workers: int = 0
    fallback_mask: str = "black"
    synthetic: Optional[SyntheticConfig] = None  # type: ignore[valid-type]


@dataclass
class TextConfig:
    mask_ignore_case: bool = True
    eot_on_truncation: bool = True
    encode_empty_slots: bool = False


@dataclass
class LossOptions:
    margin: float = 0.0
    skip_duplicate_negatives: bool = True
    margin_gradient: bool = True
    ddp_gradient: str = "global"  # global | per_rank_mean (agree.model.registry.DDP_GRADIENTS)
    margin_reduction: str = "sum"  # sum | mean


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    fused: Optional[bool] = None
    warmup_steps: int = 100
    schedule_epochs: Optional[int] = None
    exempt_1d: bool = True
    max_logit_scale: float = 4.605170185988092  # log(100)


@dataclass
class CheckpointConfig:
    every_n_train_steps: Optional[int] = None


@dataclass
class TrainerConfig:
    """``lightning.Trainer`` arguments; only those the config sets are passed (others: Lightning's
    defaults). ``Any``: Lightning takes several types (``limit_train_batches=3`` is 3 batches,
    ``0.5`` half the batches; ``devices=4``, ``[0, 1]`` or ``auto``)."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: Optional[str] = None  # null: gpu_precision on a GPU, 32-true on CPU
    max_epochs: Optional[int] = None  # >= 1, or -1: until max_steps
    max_steps: int = -1
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 50
    gradient_clip_val: Optional[float] = None
    deterministic: Any = None  # true, false or "warn"
    enable_progress_bar: Optional[bool] = None
    enable_model_summary: bool = False  # Lightning's table of the model's layers
    detect_anomaly: bool = False
    fast_dev_run: Any = False
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    overfit_batches: Any = 0.0
    val_check_interval: Any = None
    check_val_every_n_epoch: Optional[int] = 1
    num_sanity_val_steps: Optional[int] = None
    profiler: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)  # any other lightning.Trainer argument


@dataclass
class TrainConfig:
    seed: int = 0
    output_dir: str = MISSING
    ckpt_path: Optional[str] = None  # a checkpoint, or "last"
    optimized_metric: Optional[str] = "val/rsum"
    tf32: bool = True
    drop_loss: Optional[str] = None
    method: Optional[str] = None
    gpu_precision: str = "bf16-mixed"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    losses: dict[str, float] = field(default_factory=dict)  # loss name -> weight (agree.model.registry)
    loss_options: LossOptions = field(default_factory=LossOptions)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    text: TextConfig = field(default_factory=TextConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: Optional[dict[str, Any]] = None  # built from its _target_
    callbacks: Optional[dict[str, Any]] = None  # each built from its _target_


@dataclass
class EgrWeights:
    """EGR's weights of one direction (each direction's values: conf/rerank/egr.yaml)."""

    raw_weight: float = MISSING
    mask_weight: float = MISSING
    base_weight: float = MISSING
    prompt_weight: float = MISSING


@dataclass
class RerankConfig:
    stages: list[str] = field(default_factory=list)  # egr, tbr, in order
    k: int = 10  # length of the ranked lists
    absent_rank: int = 10000
    depth: int = 128  # EGR candidates per query
    max_entities: int = 10
    max_entity_words: Optional[int] = None
    text_to_image: Optional[EgrWeights] = None
    image_to_text: Optional[EgrWeights] = None
    accumulate: str = "float32"  # EGR's arithmetic: float32 | float64 (agree.retrieval.rerank.ACCUMULATE)


@dataclass
class Annotations:
    images: Optional[str] = None
    texts: Optional[str] = None
    text_segs: Optional[str] = None


@dataclass
class FeatureFiles:
    image_jsonl: Optional[str] = None
    text_jsonl: Optional[str] = None
    prompt_jsonl: Optional[str] = None
    mask_jsonl: Optional[str] = None
    mask_padding: bool = True
    precision: str = "bf16"  # fp32 | bf16 (agree.retrieval.features.PRECISIONS)
    masked_text_source: str = "texts"  # texts | text_segs (agree.retrieval.entity_rows)
    caption_entities: str = "by_id"  # by_id | by_position
    gallery_order: str = "annotations"  # annotations | files


@dataclass
class EvaluateConfig:
    seed: int = 0
    output_dir: str = MISSING
    ckpt_path: Optional[str] = None
    ckpt_required: bool = False  # set by the presets that evaluate a fine-tuned model
    ckpt_data: str = "same"  # same | any: the data ckpt_path was trained on, or any data
    batch_size: int = 128
    devices: int = 1
    device: str = "auto"
    probe: bool = True  # the binding probe (agree.retrieval.probe), where test entities exist
    method: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    annotations: Annotations = field(default_factory=Annotations)
    features: FeatureFiles = field(default_factory=FeatureFiles)
    cache_dir: Optional[str] = None  # parsed feature files (agree.data.feature_cache); null: no cache
    cache_max_gb: float = 20.0
    cache_clear: bool = False
    text: TextConfig = field(default_factory=TextConfig)
