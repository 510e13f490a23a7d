"""Parse the lines of a large text file in several processes, in file order, with exact line numbers.

JSON parsing is CPU-bound and holds the GIL (orjson builds Python objects), so threads do not help;
the file is cut at line ends into byte ranges that worker processes read and parse themselves.

A worker's parsed values come back pickled (protocol 5), the bytes of their arrays out of band
through a file in a scratch folder (in memory where there is one): through the pool's pipe they
would be copied four times, which cost more than the second process saved (measured on 2 cores).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
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


def _parse_range_out_of_band(
    folder: Path, path: Path, parse: LineParser, byte_range: tuple[int, int]
) -> tuple[int, bytes, list[int] | None, tuple[int, int] | None]:
    """:func:`_parse_range` in a worker: (lines, pickled values, sizes of their buffers, failure); the
    buffers' bytes, one after the other, are in ``folder/START.bin`` (see :func:`_received`). Where
    the folder is full (a small ``/dev/shm``), the values come pickled whole and the sizes are None.
    """
    n_lines, parsed, failed = _parse_range(path, parse, byte_range)
    buffers: list[pickle.PickleBuffer] = []
    pickled = pickle.dumps(parsed, protocol=5, buffer_callback=buffers.append)
    file = folder / f"{byte_range[0]}.bin"
    try:
        _write_buffers(file, buffers)
    except OSError:
        file.unlink(missing_ok=True)
        return n_lines, pickle.dumps(parsed, protocol=5), None, failed
    return n_lines, pickled, [buffer.raw().nbytes for buffer in buffers], failed


def _write_buffers(file: Path, buffers: list[pickle.PickleBuffer]) -> None:
    with open(file, "wb") as f:
        for buffer in buffers:
            f.write(buffer.raw())


def _received(folder: Path, byte_range: tuple[int, int], result) -> tuple[int, list, tuple[int, int] | None]:
    """A worker's :func:`_parse_range_out_of_band` result as :func:`_parse_range`'s; the arrays are
    views of the one buffer read back, and its file is removed."""
    n_lines, pickled, sizes, failed = result
    if sizes is None:
        return n_lines, pickle.loads(pickled), failed
    file = folder / f"{byte_range[0]}.bin"
    data = bytearray(sum(sizes))
    with open(file, "rb") as f:
        f.readinto(data)
    file.unlink()
    views, at = [], 0
    for size in sizes:
        views.append(memoryview(data)[at : at + size])
        at += size
    return n_lines, pickle.loads(pickled, buffers=views), failed


def _scratch_root() -> str | None:
    """Where the workers' array files go: ``/dev/shm`` (memory) where there is one, else the
    temporary folder. On a disk mounted with online discard, removing them cost 0.2-0.3 s of the
    release's four feature files (measured against ``/dev/shm``, 2 cores)."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


def _default_workers() -> int:
    """The usable CPUs, at most ``MAX_WORKERS``."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, MAX_WORKERS)


def _pool(workers: int) -> ProcessPoolExecutor:
    """The worker processes of this process, made on first use and kept for the next files.

    Forking a process that has grown (torch, the features read so far) costs more than parsing a
    range: a pool made per file took 0.95 s for a 475 MB entity feature file, a kept one 0.6 s
    (2 cores). Workers are forked where the platform can: a spawned one would re-import the
    caller's ``__main__`` (torch and all).
    """
    global _workers
    if _workers is None or _workers[0] != workers:
        if _workers is not None:
            _workers[1].shutdown()
        fork = "fork" in multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if fork else "spawn")
        _workers = (workers, ProcessPoolExecutor(workers, mp_context=context))
    return _workers[1]


_workers: tuple[int, ProcessPoolExecutor] | None = None


def _submitted(workers: int, task: Callable, ranges: list[tuple[int, int]]) -> list[Future]:
    """Each range submitted to the kept pool; one broken by a worker that died (killed for memory,
    say) is replaced."""
    global _workers
    try:
        return [_pool(workers).submit(task, byte_range) for byte_range in ranges]
    except BrokenProcessPool:
        _workers = None
        return [_pool(workers).submit(task, byte_range) for byte_range in ranges]


def parsed_lines(
    path: str | os.PathLike, parse: LineParser, workers: int | None = None, range_bytes: int | None = None
) -> Iterator[tuple[str, Any]]:
    """(``file:line``, ``parse(line, "")``) for every non-blank line of ``path``, in file order.

    ``parse`` (a picklable function of the raw line and its location) raises ``ValueError`` on a
    bad line; that line is then parsed again here with its ``file:line`` location, so the error
    raised names it. Ranges are parsed by ``workers`` processes (default: the usable CPUs, at most
    8) when the file spans several ranges of ``range_bytes`` (default ``RANGE_BYTES``); ``OSError``
    reaches the caller.

    The ranges go to the workers at this call, before the iterator is read: call it for several
    files, then read them in turn, and the workers parse the next file while the caller assembles
    the previous one (0.3 s of 2 s for the release's four feature files, 2 cores).
    """
    path = Path(path)
    ranges = _byte_ranges(path, path.stat().st_size, range_bytes or RANGE_BYTES)
    workers = _default_workers() if workers is None else workers
    if workers <= 1 or len(ranges) <= 1:
        return _in_order(path, parse, map(partial(_parse_range, path, parse), ranges))
    scratch = tempfile.TemporaryDirectory(prefix="agree-lines-", dir=_scratch_root())  # the arrays' files
    task = partial(_parse_range_out_of_band, Path(scratch.name), path, parse)
    futures = _submitted(workers, task, ranges)
    lines = _received_in_order(path, parse, ranges, futures, scratch)
    weakref.finalize(lines, _discard, futures, scratch)  # also when the iterator is dropped unread
    return lines


def _received_in_order(
    path: Path,
    parse: LineParser,
    ranges: list[tuple[int, int]],
    futures: list[Future],
    scratch: tempfile.TemporaryDirectory,
) -> Iterator[tuple[str, Any]]:
    folder = Path(scratch.name)
    try:
        received = (_received(folder, r, f.result()) for r, f in zip(ranges, futures, strict=True))
        yield from _in_order(path, parse, received)
    finally:  # also when the caller stops early
        _discard(futures, scratch)


def _discard(futures: list[Future], scratch: tempfile.TemporaryDirectory) -> None:
    """Drop the ranges not yet started, wait for the others, then remove their folder (once)."""
    for future in futures:
        future.cancel()
    wait(futures)
    scratch.cleanup()


def _in_order(
    path: Path, parse: LineParser, results: Iterable[tuple[int, list, tuple[int, int] | None]]
) -> Iterator[tuple[str, Any]]:
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
