"""Images as the release stores them: an open_clip model's evaluation preprocessing, boxes blanked.

open_clip's evaluation transform is split in two: its geometry (resize and crop or pad to S×S,
on PIL images) and its normalisation (``pixels.normalise`` with the transform's own mean and
std), so a box given in the raw image can be blanked exactly where the geometry moves it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from omegaconf import OmegaConf
from open_clip.transform import (
    MaybeConvertMode,
    MaybeToTensor,
    PreprocessCfg,
    image_transform_v2,
)
from PIL import Image, ImageDraw, UnidentifiedImageError
from torchvision.transforms import Compose, Normalize

from agree.data.pixels import Box, normalise
from agree.errors import ConfigError, DataFormatError
from agree.model import clip
from agree.prepare.shards import ShardResult

MAX_PIXELS = 89_478_485  # Pillow's default limit: larger images are refused before decoding (bombs)


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB image of at most ``max_pixels`` pixels, or a one-line error naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is checked below
            with Image.open(path) as image:  # reads the header only
                if image.width * image.height > max_pixels:
                    raise DataFormatError(
                        f"{path}: {image.width}x{image.height} pixels, more than the limit of {max_pixels}"
                    )
                return image.convert("RGB")
    except FileNotFoundError:
        raise DataFormatError(f"{path}: image not found") from None
    except Image.DecompressionBombError as e:  # Pillow's own limit, checked when it opens the file
        raise DataFormatError(f"{path}: {e}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataFormatError(f"{path}: cannot read the image ({e})") from None


def image_file(images: Path, image: str) -> Path:
    """The file of an annotation's ``image`` field (``flickr30k-images/1.jpg``) in the folder ``images``.

    The field's first component names the image folder; the user's folder may be named otherwise.
    """
    return images.joinpath(*PurePosixPath(image).parts[1:])


@dataclass(frozen=True)
class Preprocess:
    """A model's evaluation preprocessing: ``geometry`` (PIL, to S×S), then ``mean``/``std``."""

    size: int
    geometry: Callable[[Image.Image], Image.Image]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def for_model(
        cls, model: str, pretrained: str | None = None, image_size: int | None = None
    ) -> Preprocess:
        clip.check_model(model, pretrained, ("model", "pretrained"), activation=False)
        cfg = clip.preprocess_config(model, pretrained, image_size)
        steps = image_transform_v2(PreprocessCfg(**cfg), is_train=False).transforms
        *geometry, convert, to_tensor, norm = steps
        if not (
            isinstance(convert, MaybeConvertMode)
            and isinstance(to_tensor, MaybeToTensor)
            and isinstance(norm, Normalize)
        ):
            raise RuntimeError(f"unexpected open_clip evaluation transform: {steps}")
        size = cfg["size"]
        if not isinstance(size, int) and len(set(size)) != 1:
            raise ConfigError(f"{model}: non-square input size {size} is not supported (npz images are S×S)")
        side = int(size if isinstance(size, int) else size[0])
        return cls(side, Compose(geometry), tuple(norm.mean), tuple(norm.std))

    def params(self) -> dict:
        """A JSON description (for shard manifests): what makes two preprocessings differ."""
        return {"geometry": repr(self.geometry), "mean": list(self.mean), "std": list(self.std)}

    def pixels(self, image: Image.Image) -> np.ndarray:
        """uint8 S×S×3 pixels of an RGB image after the geometry."""
        return np.asarray(self.geometry(image), dtype=np.uint8)

    def array(self, pixels: np.ndarray, blank: Box | None = None) -> np.ndarray:
        """float32 3×S×S as stored in the npz files, with the (S×S) ``blank`` box black."""
        return normalise(pixels, blank, self.mean, self.std)

    def map_box(self, image_size: tuple[int, int], box: tuple[float, float, float, float]) -> Box | None:
        """A box (x0, y0, x1, y1) of a raw image of ``image_size`` (W, H), moved by the geometry.

        The box is drawn as a mask that goes through the same geometry; None when it ends up
        outside the S×S image (cropped away) or is empty.
        """
        width, height = image_size
        x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
        x1, y1 = min(width, int(np.ceil(box[2]))), min(height, int(np.ceil(box[3])))
        if x1 <= x0 or y1 <= y0:
            return None
        mask = Image.new("L", image_size, 0)
        ImageDraw.Draw(mask).rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
        inside = np.asarray(self.geometry(mask)) > 127
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        if not len(rows):
            return None
        return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


MODEL_PRESETS = Path(__file__).parents[1] / "conf" / "model"  # agree.train's model group
DEFAULT_PRETRAINED = "openai"


@dataclass
class ImageOptions:
    """Config keys of the steps that write npz images: the open_clip model whose preprocessing to use."""

    model: str = (
        "ViT-L-14-quickgelu"  # an open_clip model name, or a preset of agree.train (tiny, vit_l14, ...)
    )
    pretrained: str | None = (
        DEFAULT_PRETRAINED  # its weights tag (sets mean/std for some models); no download
    )
    image_size: int | None = None  # null: the model's own input size
    shard_size: int = 256

    def model_keys(self) -> tuple[str, str | None, int | None]:
        """(open_clip name, weights, image size) of ``model``, ``pretrained`` and ``image_size``.

        ``model`` may name a preset of ``agree.train``'s ``model`` group (``tiny``, ``scenes_pretrained``,
        ``vit_b32``, ``vit_l14``), as training takes it: the preset's name, weights and size are used.
        """
        path = MODEL_PRESETS / f"{self.model}.yaml"
        if not path.is_file():
            return self.model, self.pretrained, self.image_size
        preset = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        name, weights, size = preset["name"], preset["pretrained"], preset["image_size"]
        for key, given, own in (
            ("pretrained", self.pretrained, weights),
            ("image_size", self.image_size, size),
        ):
            if given not in (own, DEFAULT_PRETRAINED if key == "pretrained" else None):
                raise ConfigError(
                    f"model={self.model} is a preset (model {name}, pretrained {weights}, image_size "
                    f"{size}); for {key}={given}, give model={name} {key}={given}"
                )
        return name, weights, size

    def preprocess(self) -> Preprocess:
        return Preprocess.for_model(*self.model_keys())


@dataclass(frozen=True)
class EncodeImages:
    """Shard work: ``[key, path]`` items -> the ``images`` array group, one preprocessed image a key."""

    preprocess: Preprocess

    def __call__(self, items: Sequence[Sequence[str]]) -> ShardResult:
        pre = self.preprocess
        arrays = {key: pre.array(pre.pixels(load_image(path))) for key, path in items}
        return ShardResult(arrays={"images": arrays})
