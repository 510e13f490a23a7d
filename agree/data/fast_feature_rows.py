"""The fast path of the feature JSONL readers: plain rows parsed without a Python float per number.

Parsing the numbers is the cost of reading these files: orjson builds a Python float per number and
numpy converts them back. simdjson's ``Array.as_buffer`` parses a number array straight into a C
buffer (``scripts/bench_retrieval.py`` prints both readers' MB/s); numpy's own text parsers
(``loadtxt``, ``fromstring``) were measured slower than orjson.

Only rows that are plainly valid take this path: an object of exactly the id key and ``"feature"``, a
non-empty list of numbers or of equal-length non-empty lists of numbers, every value below 2**53 in
magnitude (an integer is then exact as a float64, and any value finite in float32). Anything else
(:func:`fast_feature_row` returns None) is read by the validated path, which gives the same values
and raises the one-line errors (``tests/test_fast_feature_rows.py`` checks that both agree).
"""

from __future__ import annotations

import numpy as np

from agree.data.json_lines import parse_id

try:
    import simdjson
except ImportError:  # pysimdjson has wheels for the usual platforms; elsewhere every row is validated
    simdjson = None

# the simdjson parser of this process (made on first use)
_parser = None

# integers beyond this are not exact as float64: numpy's int64 -> float32 rounds them once, the
# double's path twice, so such rows are left to the validated path
_EXACT_INTEGERS = 2.0**53
_KEEP_PARSER_BYTES = 16 << 20


def available() -> bool:
    """Whether the fast path can run here (pysimdjson is installed)."""
    return simdjson is not None


def fast_feature_row(line: bytes, id_key: str, where: str) -> tuple[str, np.ndarray] | None:
    """(canonical id, float32 array) of a plainly valid feature line, or None to validate it fully.

    The array is ``(D,)`` for a list of numbers and ``(E, D)`` for a list of E lists of D numbers,
    equal to what the validated path gives for the same line.
    """
    global _parser
    # orjson refuses a BOM that simdjson skips; leading blanks are left to the validated path too
    if simdjson is None or line[:1] != b"{":
        return None
    _parser = _parser or simdjson.Parser()
    try:
        return _plain_row(_parser.parse(line), line, id_key, where)
    except (ValueError, TypeError, RuntimeError, KeyError):  # not JSON, not numbers, > 64-bit integers
        return None
    finally:
        if len(line) > _KEEP_PARSER_BYTES:  # a parser keeps the memory of the longest line it parsed
            _parser = None


def _plain_row(doc, line: bytes, id_key: str, where: str) -> tuple[str, np.ndarray] | None:
    if not isinstance(doc, simdjson.Object) or len(doc) != 2 or id_key not in doc or "feature" not in doc:
        return None  # also rejects a duplicated key, which orjson reads as its last value
    key, feature = doc[id_key], doc["feature"]
    if type(key) not in (int, str) or not isinstance(feature, simdjson.Array) or not len(feature):
        return None
    values = np.frombuffer(feature.as_buffer(of_type="d"), dtype=np.float64)
    shape = _shape(feature, _count(line, ord("[")), values.size)
    # below 2**53 every float32 is finite: no check of the cast is needed
    if shape is None or values.min() <= -_EXACT_INTEGERS or values.max() >= _EXACT_INTEGERS:
        return None
    array = values.astype(np.float32).reshape(shape)
    return parse_id(key, where, id_key), array


def _count(line: bytes, byte: int) -> int:
    """How many times ``byte`` occurs in ``line``: numpy's vectorised comparison takes half the time
    of ``bytes.count``; slice by slice, so that a long line costs no second copy of its size."""
    data = np.frombuffer(line, dtype=np.uint8)
    return sum(int(np.count_nonzero(data[i : i + _SLICE] == byte)) for i in range(0, len(data), _SLICE))


_SLICE = 1 << 20


def _shape(feature, brackets: int, size: int) -> tuple[int, ...] | None:
    """(size,) for a flat list, (E, D) for E lists of D > 0 numbers (E * D = ``size`` values), None
    otherwise.

    ``as_buffer`` flattens nested lists, so the nesting is checked here: the line holds one ``[`` for
    a flat list and E + 1 for a list of lists (an id string holding ``[`` only sends the row to the
    validated path). simdjson's ``len`` stops at ``_SATURATED`` (its tape keeps 24 bits of a count):
    a flat list's length is the number of values read, and longer nested lists are left to the
    validated path.
    """
    if not isinstance(feature[0], simdjson.Array):
        return (size,) if brackets == 1 else None
    rows = len(feature)
    if (
        rows >= _SATURATED
        or brackets != rows + 1
        or not all(isinstance(row, simdjson.Array) for row in feature)
    ):
        return None
    width = len(feature[0])
    if not 0 < width < _SATURATED or any(len(row) != width for row in feature) or rows * width != size:
        return None
    return (rows, width)


_SATURATED = 2**24 - 1
