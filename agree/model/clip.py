"""open_clip model loading and encoders.

``pretrained`` is an open_clip tag (``openai``, ``laion2b_s34b_b79k``, ...), a local open_clip
weights file, or a checkpoint written by ``agree.train`` (``.ckpt``). Checkpoints store the model
name, and loading one under another name fails instead of silently changing the network.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, merge_preprocess_dict

from agree.console import weights_loaded_after
from agree.errors import ConfigError, one_line

open_clip.add_model_config(Path(__file__).parent / "configs")  # the tiny CPU config ("agree-tiny")

CHECKPOINT_KEY = "agree_model_name"
DATA_KEY = "agree_data"  # the training data: kind, root, prefix, image_size (agree.config.data_source)


class ModelLoadError(ConfigError):
    """The model could not be built or its weights loaded; the message says what to do."""


WEIGHT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


def check_model(
    name: str,
    pretrained: str | None = None,
    keys: tuple[str, str] = ("model.name", "model.pretrained"),
    activation: bool = True,
) -> None:
    """``name`` is an open_clip architecture and ``pretrained`` null, an existing file or one of its
    tags: the one check of the model keys (``keys``: their names in the command's config) of every
    command. ``activation``: the tag's weights also need the activation ``name`` uses (QuickGELU)."""
    if name not in open_clip.list_models():
        hint = "choose model=tiny, vit_b32 or vit_l14, or " if keys[0] == "model.name" else "choose "
        raise ModelLoadError(
            f"{keys[0]}={name} is not an open_clip architecture; {hint}a name of open_clip.list_models()"
        )
    if not pretrained or Path(pretrained).expanduser().is_file():
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if Path(pretrained).suffix in WEIGHT_SUFFIXES or "/" in str(pretrained) or pretrained not in tags:
        raise ModelLoadError(
            f"{keys[1]}={pretrained} is neither a file nor a pretrained tag of {name}: file not found "
            f"({Path(pretrained).expanduser().resolve()}); give an existing weights file, null, or a tag: "
            f"the tags are {tags}"
        )
    tag_cfg, model_cfg = open_clip.get_pretrained_cfg(name, pretrained), open_clip.get_model_config(name)
    if activation and tag_cfg.get("quick_gelu") and not model_cfg.get("quick_gelu"):
        # open_clip only warns, and accuracy drops silently (and a reloaded checkpoint would differ)
        raise ModelLoadError(
            f"{pretrained!r} weights were trained with QuickGELU: use {keys[0]}={name}-quickgelu, not {name}"
        )


def create_clip(name: str, pretrained: str | None = None) -> torch.nn.Module:
    """Build the open_clip model ``name`` with ``pretrained`` weights (or random init if None)."""
    check_model(name, pretrained)
    if pretrained and Path(pretrained).suffix == ".ckpt":
        with weights_loaded_after():
            model = open_clip.create_model(name, pretrained=None, output_dict=True)
        load_training_checkpoint(model, name, pretrained)
        return model
    try:
        return open_clip.create_model(name, pretrained=pretrained or None, output_dict=True)
    except RuntimeError as e:
        hint = " (no network? put the weights file on disk and pass its path)" if pretrained else ""
        raise ModelLoadError(f"could not load {name} with pretrained={pretrained!r}: {e}{hint}") from e


def preprocess_config(name: str, pretrained: str | None = None, image_size: int | None = None) -> dict:
    """open_clip's evaluation preprocessing of model ``name`` with tag ``pretrained`` (no weights loaded):
    ``size``, ``mean``, ``std``, interpolation and resize mode. A weights file keeps the defaults."""
    check_model(name, pretrained, activation=False)
    model_cfg = open_clip.get_model_config(name)
    cfg = merge_preprocess_dict(PreprocessCfg(), model_cfg.get("preprocess_cfg", {}))
    cfg["size"] = model_cfg.get("vision_cfg", {}).get("image_size", cfg["size"])
    if pretrained:
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(name, pretrained))
    if image_size:
        cfg["size"] = image_size
    return cfg


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """An ``agree.train`` checkpoint (tensors never unpickled); ``mmap``: tensors stay on disk until
    read, so reading its metadata costs little."""
    if not Path(path).is_file():
        raise ModelLoadError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ModelLoadError(f"{path}: not a checkpoint of agree.train ({one_line(e)})") from None


def check_checkpoint_model(checkpoint: dict, name: str, path: str | Path) -> None:
    """The checkpoint holds a model named ``name``."""
    stored = checkpoint.get(CHECKPOINT_KEY)
    if stored != name:
        raise ModelLoadError(
            f"{path} holds a {stored!r} model, but model.name={name!r}; set model.name={stored}"
        )


def load_training_checkpoint(model: torch.nn.Module, name: str, path: str | Path) -> None:
    """Load the model weights of an ``agree.train`` checkpoint, refusing another architecture."""
    checkpoint = read_checkpoint(path)
    check_checkpoint_model(checkpoint, name, path)
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)


def supports_short_text(model: torch.nn.Module) -> bool:
    """True when the text tower can run on sequences cut to their real length.

    That holds for open_clip's built-in text transformer with a causal mask and EOT pooling:
    tokens after the EOT token cannot influence it.
    """
    return (
        isinstance(model, open_clip.CLIP)
        and model.attn_mask is not None
        and model.text_pool_type in ("argmax", "eos")
    )


def _eot_positions(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    if model.text_pool_type == "argmax":
        return tokens.argmax(dim=-1)
    return (tokens == model.text_eos_id).int().argmax(dim=-1)


def _encode_text_cut(model: torch.nn.Module, tokens: torch.Tensor, length: int) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` on the first ``length`` positions only."""
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = open_clip.transformer.text_global_pool(
        x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
    )
    x = (
        model.text_projection(x)
        if isinstance(model.text_projection, torch.nn.Linear)
        else x @ model.text_projection
    )
    return F.normalize(x, dim=-1)


def encode_text(
    model: torch.nn.Module, tokens: torch.Tensor, lengths: Sequence[int] | None = None, bucket: int = 64
) -> torch.Tensor:
    """L2-normalised text features, each text encoded only up to (about) its real length.

    open_clip's ``CLIP.encode_text`` always runs all 77 positions; captions are ~15 tokens. We
    repeat its few lines with the positional embedding and causal mask cut, after sorting the
    texts by length into groups of ``bucket`` so one long caption does not pad the others (a last
    group of one text joins the one before: a compiled text tower never sees a batch of one).

    ``lengths``: each text's positions up to its end token at least, known on the host (the
    collate's ``token_lengths``); without them they are read from ``tokens``, one transfer to the
    host per call. The groups are planned on the host, so no value is read back per group.
    """
    if not supports_short_text(model):
        return model.encode_text(tokens, normalize=True)
    lengths = (_eot_positions(model, tokens) + 1).tolist() if lengths is None else list(lengths)
    if len(tokens) <= bucket:
        return _encode_text_cut(model, tokens, max(lengths, default=1))
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups = [order[i : i + bucket] for i in range(0, len(order), bucket)]
    if len(groups[-1]) == 1:
        last = groups.pop()
        groups[-1] += last
    index = torch.tensor(order).to(tokens.device, non_blocking=True)
    chunks = tokens[index].split([len(group) for group in groups])
    parts = [
        _encode_text_cut(model, chunk, max(lengths[i] for i in group))
        for chunk, group in zip(chunks, groups, strict=True)
    ]
    return torch.cat(parts)[torch.argsort(index)]


def encode_image(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image features."""
    return model.encode_image(images, normalize=True)
