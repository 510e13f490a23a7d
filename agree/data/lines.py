"""Parse the lines of a large text file in several processes, in file order, with exact line numbers.

JSON parsing is CPU-bound and holds the GIL (orjson builds Python objects), so threads do not help;
the file is cut at line ends into byte ranges that worker processes read and parse themselves.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

# Byte ranges of this size are parsed per task: big enough to hide the inter-process cost, small
# enough that a worker holds little text at once. Smaller files are parsed in this process.
RANGE_BYTES = 16 << 20
MAX_WORKERS = 8

# a function of the raw line (bytes, or a memoryview of them) and its location
LineParser = Callable[[bytes | memoryview, str], Any]


def _byte_ranges(path: Path, size: int, range_bytes: int) -> list[tuple[int, int]]:
    """Consecutive (start, stop) byte ranges of about ``range_bytes`` each, cut after a newline."""
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] < size:
            f.seek(cuts[-1] + range_bytes)
            f.readline()
            cuts.append(min(f.tell(), size))
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _parse_range(
    path: Path, parse: LineParser, byte_range: tuple[int, int]
) -> tuple[int, list[tuple[int, Any]], tuple[int, int] | None]:
    """(lines in the range, [(line index, parse(line, ""))], first failing (index, byte offset) or None).

    Each line is passed as a memoryview of the range's bytes: splitting would copy the whole range.
    """
    start, stop = byte_range
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(stop - start)
    view, parsed, index, at = memoryview(data), [], 0, 0
    while at < len(data):
        end = data.find(b"\n", at)
        end = len(data) if end < 0 else end
        line = view[at:end]
        if _nonblank(line):
            try:
                parsed.append((index, parse(line, "")))
            except ValueError:
                return index + 1, parsed, (index, start + at)
        index, at = index + 1, end + 1
    return index, parsed, None


def _nonblank(line: memoryview) -> bool:
    """Whether the line holds more than ASCII whitespace (the first byte tells, but for blank lines)."""
    return bool(line) and (line[0] not in _WHITESPACE or bool(bytes(line).strip()))


_WHITESPACE = frozenset(b" \t\r\x0b\x0c")


def _default_workers() -> int:
    """The usable CPUs (at most ``MAX_WORKERS``); 1 below 4 CPUs, where starting workers and sending
    the parsed rows back cost more than they save (measured slower on 2 cores)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, MAX_WORKERS) if cpus >= 4 else 1


def parsed_lines(
    path: str | os.PathLike, parse: LineParser, workers: int | None = None, range_bytes: int | None = None
) -> Iterator[tuple[str, Any]]:
    """(``file:line``, ``parse(line, "")``) for every non-blank line of ``path``, in file order.

    ``parse`` (a picklable function of the raw line and its location) raises ``ValueError`` on a
    bad line; that line is then parsed again here with its ``file:line`` location, so the error
    raised names it. Ranges are parsed by ``workers`` processes (default: the usable CPUs, at most
    8) when the file spans several ranges of ``range_bytes`` (default ``RANGE_BYTES``); ``OSError``
    reaches the caller.
    """
    path = Path(path)
    ranges = _byte_ranges(path, path.stat().st_size, range_bytes or RANGE_BYTES)
    workers = min(_default_workers() if workers is None else workers, len(ranges))
    task = partial(_parse_range, path, parse)
    if workers <= 1:
        yield from _in_order(path, parse, map(task, ranges))
        return
    # fork where there is one: a spawned worker would re-import the caller's __main__ (torch and all)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context)
    try:
        yield from _in_order(path, parse, pool.map(task, ranges))
    finally:  # also when the caller stops early: drop the ranges not yet started
        pool.shutdown(wait=True, cancel_futures=True)


def _in_order(path: Path, parse: LineParser, results) -> Iterator[tuple[str, Any]]:
    first_line = 1
    for n_lines, parsed, failed in results:
        for index, value in parsed:
            yield f"{path}:{first_line + index}", value
        if failed is not None:
            index, offset = failed
            with open(path, "rb") as f:
                f.seek(offset)
                parse(f.readline().rstrip(b"\n"), f"{path}:{first_line + index}")  # raises, naming the line
            raise AssertionError(f"{path}:{first_line + index}: failed in a worker, parsed here")
        first_line += n_lines
