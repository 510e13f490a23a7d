"""Worker processes die with the command that forked them: a killed command leaves none running.

A DataLoader worker notices that its parent is gone only between items (torch checks every 5 s),
and one busy loading was seen running 40 s after a ``kill -9`` of its command, holding the
inherited run lock (``agree.runlock``) and the terminal. :func:`die_with_parent` has every process
forked from this one (DataLoader workers, multiprocessing) killed by the kernel when this one ends:
Linux's ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, set in the child right after the fork. Processes
started with ``subprocess`` (an ``exec``) are not concerned. Elsewhere than on Linux it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_forking: int | None = None  # the pid of the process that forks, seen from the child
_prctl = None  # libc's prctl, looked up before any fork: dlopen in a child of threads can deadlock


def _before_fork() -> None:
    global _forking
    _forking = os.getpid()


def _in_child() -> None:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _forking:  # the parent died before the line above: no signal will come
        os._exit(1)


def die_with_parent() -> None:
    """From now on, a process forked from this one is killed when this one ends (once per process).

    The kernel signals the child when the *thread* that forked it ends: DataLoader workers are
    forked by the thread that iterates the loader, which lives as long as the command.
    """
    global _prctl
    if sys.platform.startswith("linux") and _prctl is None:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
        os.register_at_fork(before=_before_fork, after_in_child=_in_child)
