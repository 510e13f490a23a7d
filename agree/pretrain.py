"""Pretrain the tiny CLIP on the alt-text corpus: the embedded stand-in for a web-pretrained model.

    python -m agree.pretrain output=OUT.safetensors [steps=N corpus.seed=S ...]    (--help: every key)

The result knows shapes and colours but binds them poorly (see ``agree.data.alt_text``); it is
what ``model=scenes_pretrained`` loads (``agree/model/weights/``). Deterministic per seed on a
given machine and thread count. Weights are stored as fp16 safetensors (open_clip casts them
back to fp32 on loading) and the command prints their SHA-256.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING
from safetensors.torch import save_file

from agree.atomic import atomic_path
from agree.cli import run_command
from agree.data.alt_text import AltTextConfig, batch
from agree.model.clip import create_clip, encode_image, encode_text
from agree.model.losses import contrastive_loss
from agree.model.module import MAX_LOGIT_SCALE, parameter_groups, warmup_cosine
from agree.model.tokenizer import get_tokenizer


@dataclass(frozen=True)
class PretrainConfig:
    """The corpus, the model and the optimisation (AdamW β 0.9/0.98, cosine after warm-up)."""

    corpus: AltTextConfig = field(default_factory=AltTextConfig)
    model_name: str = "agree-tiny"
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100


def pretrain(cfg: PretrainConfig, log_every: int = 0) -> torch.nn.Module:
    """A model trained with the symmetric InfoNCE loss on ``cfg.steps`` corpus batches.

    Identical captions in a batch (two "a red circle" images) are not each other's negatives.
    """
    torch.manual_seed(cfg.corpus.seed)
    model = create_clip(cfg.model_name, None).train()
    tokenizer = get_tokenizer(cfg.model_name)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, cfg.warmup_steps, cfg.steps)
    )
    start = time.perf_counter()
    for step in range(cfg.steps):
        images, texts = batch(cfg.corpus, step, cfg.batch_size)
        ids = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        keys = torch.tensor([ids[t] for t in texts])
        loss = contrastive_loss(
            encode_image(model, torch.from_numpy(images)),
            encode_text(model, tokenizer(texts)),
            model.logit_scale.exp(),
            keys_all=keys,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        if log_every and (step + 1) % log_every == 0:
            elapsed = time.perf_counter() - start
            print(f"step {step + 1}/{cfg.steps}  loss {loss.item():.3f}  {elapsed:.0f} s", file=sys.stderr)
    return model.eval()


def save_weights(model: torch.nn.Module, path: str | Path) -> str:
    """Write the state dict as fp16 safetensors, atomically; return the file's SHA-256."""
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    return sha256(path)


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class PretrainCommand(PretrainConfig):
    """Pretrain the tiny CLIP on the alt-text corpus; write fp16 safetensors to output, print the SHA-256."""

    output: str = MISSING  # the weights file to write (.safetensors)


def _pretrain(cfg: PretrainCommand) -> None:
    digest = save_weights(pretrain(cfg, log_every=100), cfg.output)
    print(f"wrote {cfg.output}  sha256 {digest}")


def main(argv: list[str] | None = None) -> None:
    """``python -m agree.pretrain output=FILE key=value ...``; ``--help`` lists the keys."""
    run_command("python -m agree.pretrain", PretrainCommand, _pretrain, argv)


if __name__ == "__main__":
    main()
