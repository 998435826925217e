"""Small shared helpers: parameter counts, peak memory, seeding."""

from __future__ import annotations

import os
import random
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import FusegptError


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Peak memory during a ``with`` block: CUDA allocator peak, or sampled process RSS on CPU."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.05):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, _rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mb = _rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, _rss_mb())


class MemoryBudgetExceeded(FusegptError, MemoryError):
    """A run's measured memory crossed the budget it was given (``--max-memory``). ``state`` / ``size``:
    the run state kept for ``--resume`` (filled by :func:`fusegpt.prune`), or None."""

    exit_code = 1
    state: Path | None = None
    size: int = 0


class MemoryGuard:
    """Stop the main thread (KeyboardInterrupt, turned into :class:`MemoryBudgetExceeded` on exit)
    when the run's memory crosses ``limit_bytes``.

    The run's memory is what the process (RSS, or the CUDA allocator on a GPU) holds beyond what it
    held when the guard started, plus ``baseline_bytes`` (what the estimate counts as resident
    before the work: runtime and weights). So memory that a notebook or a test process held before
    the run does not count against the run; without ``baseline_bytes`` the whole process counts.
    """

    def __init__(self, limit_bytes: int, device: torch.device | str = "cpu", interval: float = 0.1,
                 baseline_bytes: int | None = None):
        self.limit_mb = limit_bytes / 2**20
        self.device = torch.device(device)
        self.interval = interval
        self.baseline_mb = None if baseline_bytes is None else baseline_bytes / 2**20
        self.tripped_mb: float | None = None
        self._stop = threading.Event()
        self._start_mb = 0.0

    def _raw_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return _rss_mb()

    def _used_mb(self) -> float:
        raw = self._raw_mb()
        return raw if self.baseline_mb is None else raw - self._start_mb + self.baseline_mb

    def _watch(self) -> None:
        import _thread

        while not self._stop.is_set():
            used = self._used_mb()
            if used > self.limit_mb:
                self.tripped_mb = used
                _thread.interrupt_main()
                return
            time.sleep(self.interval)

    def _exceeded(self) -> MemoryBudgetExceeded:
        return MemoryBudgetExceeded(
            f"stopped: the run used {self.tripped_mb:,.0f} MiB, over the --max-memory budget of "
            f"{self.limit_mb:,.0f} MiB; lower nsamples/seqlen/batch sizes, group_size or max_terms, use "
            "--offload disk, or raise --max-memory")

    def __enter__(self) -> MemoryGuard:
        self._start_mb = self._raw_mb()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        try:  # the watcher may trip before start() returns: that interrupt lands here, not in the caller
            self._thread.start()
        except KeyboardInterrupt:
            if self.tripped_mb is None:
                raise
            self._stop.set()
            self._thread.join()
            raise self._exceeded() from None
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        try:
            self._thread.join()
            if self.tripped_mb is not None and exc_type is None:
                time.sleep(0.05)  # an interrupt sent as the work ended lands here, not after the guard
        except KeyboardInterrupt:
            if self.tripped_mb is None:
                raise
        if self.tripped_mb is not None and (exc_type is None or issubclass(exc_type, KeyboardInterrupt)):
            raise self._exceeded() from None
        return False


@contextmanager
def timed():
    """``with timed() as t: ...``; ``t()`` gives the elapsed seconds."""
    start = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())
