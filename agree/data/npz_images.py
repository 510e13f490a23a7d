"""Lazy, validated access to the release's npz arrays of preprocessed images."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from agree.data.json_lines import canonical_id, show
from agree.errors import DataFormatError, one_line

# what a damaged zip member or npy header raises inside numpy and zipfile
NPZ_ERRORS = (ValueError, OSError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile, RuntimeError)


class NpzImages:
    """Lazy, validated access to an npz of preprocessed images (3×S×S float, CLIP-normalised).

    Keys are matched as ids (``canonical_id``). Each array is checked on access for shape, dtype
    and finiteness. Pickled objects are never loaded. The archive is opened per process, so
    instances are safe to send to DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike, image_size: int):
        self.path = Path(path)
        self.shape = (3, image_size, image_size)
        if not self.path.is_file():
            raise DataFormatError(f"{self.path}: file not found")
        try:
            with zipfile.ZipFile(self.path) as z:
                names = [n[: -len(".npy")] for n in z.namelist() if n.endswith(".npy")]
        except NPZ_ERRORS as e:
            raise DataFormatError(f"{self.path}: not an npz archive ({one_line(e)})") from None
        self._keys: dict[str, str] = {}
        for name in names:
            key = canonical_id(name)
            if key in self._keys:
                raise DataFormatError(
                    f"{self.path}: arrays {show(self._keys[key])} and {show(name)} name the same id"
                )
            self._keys[key] = name
        self._archive = None
        self._pid = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_archive": None, "_pid": None}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: Any) -> bool:
        return canonical_id(key) in self._keys

    def keys(self) -> list[str]:
        """The canonical ids of the arrays."""
        return list(self._keys)

    def first_shape(self) -> tuple[int, ...] | None:
        """The shape of the archive's first array (None when it holds none), without checking it."""
        return self._load(next(iter(self._keys.values()))).shape if self._keys else None

    def require(self, keys: list[str], what: str) -> None:
        """Fail with the first of ``keys`` (named in ``what``) that the archive lacks."""
        for key in keys:
            if canonical_id(key) not in self._keys:
                raise DataFormatError(f"{self.path}: no array for {what} {key!r} ({len(self)} keys present)")

    def _load(self, name: str) -> np.ndarray:
        try:
            if self._archive is None or self._pid != os.getpid():
                self._archive = np.load(self.path, allow_pickle=False)
                self._pid = os.getpid()
            return self._archive[name]
        except NPZ_ERRORS as e:  # object arrays need pickle, which we never allow; damaged members
            raise DataFormatError(f"{self.path}: key {name!r}: {one_line(e)}") from None

    def __getitem__(self, key: Any) -> np.ndarray:
        name = self._keys.get(canonical_id(key))
        if name is None:
            raise DataFormatError(f"{self.path}: no array for key {key!r}")
        array = self._load(name)
        if not np.issubdtype(array.dtype, np.floating):
            raise DataFormatError(f"{self.path}: key {name!r}: dtype {array.dtype}, expected a float array")
        if array.shape != self.shape:
            raise DataFormatError(f"{self.path}: key {name!r}: shape {array.shape}, expected {self.shape}")
        if not np.isfinite(array).all():
            raise DataFormatError(f"{self.path}: key {name!r}: contains NaN or infinite values")
        return array
