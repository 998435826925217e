"""What a run carries from step to step, kept on a :class:`RunContext` and never on the model.

* the adapter (one for the whole run: it knows each current block's original index),
* the tokenizer,
* the decoder as it was when the run started (width methods count their sparsity against it),
* where resumable steps keep their run state (``<output>.state/<step>-<method>/``) and whether
  to resume from it.

The state folders are removed once the output is saved; after an interruption they stay, and
:class:`Interrupted` says where they are, how large, and how to resume.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RunStateError
from .memory import format_size
from .models import DecoderAdapter


@dataclass
class RunContext:
    """Everything a method's runner needs besides its config and the step report."""

    adapter: DecoderAdapter
    tokenizer: object
    start_decoder_params: int = 0
    state_root: Path | None = None
    resume: bool = False
    step_index: int = 0
    step_started: float = field(default_factory=time.perf_counter)
    earlier_s: float = 0.0  # wall time of this step in the runs before a resume

    def start_step(self, index: int) -> None:
        self.step_index = index
        self.step_started = time.perf_counter()
        self.earlier_s = 0.0

    def step_elapsed(self) -> float:
        """Wall time of the current step so far, the interrupted runs it resumed included."""
        return self.earlier_s + time.perf_counter() - self.step_started

    @classmethod
    def start(cls, adapter: DecoderAdapter, tokenizer, state_root: str | Path | None = None,
              resume: bool = False) -> RunContext:
        return cls(adapter=adapter, tokenizer=tokenizer,
                   start_decoder_params=sum(p.numel() for p in adapter.layers.parameters()),
                   state_root=Path(state_root) if state_root is not None else None, resume=resume)

    def state_dir(self, method: str) -> Path | None:
        """This step's state folder (None when the run keeps no state; the whole root is removed
        once the output is saved)."""
        if self.state_root is None:
            return None
        return self.state_root / f"{self.step_index}-{method}"


def state_root_for(output: str | Path) -> Path:
    """Where a run writing ``output`` keeps its resumable state."""
    return Path(f"{Path(output).expanduser()}.state")


def folder_size(path: str | Path) -> int:
    p = Path(path)
    if not p.exists():
        return 0
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def clear_state(root: str | Path | None) -> None:
    """Remove a run's state folder once its output is saved."""
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


def kept_state(root: Path | None) -> Path | None:
    """``root`` when it holds a run state worth keeping (a non-empty folder), else None."""
    return root if root is not None and root.is_dir() and any(root.iterdir()) else None


def describe_state(root: Path) -> str:
    """What a kept run state holds, for messages: its size and how far each step got."""
    done = []
    for sj in sorted(root.glob("*/state.json")):
        try:
            d = json.loads(sj.read_text())
            done.append(f"{sj.parent.name}: {d.get('done')} block(s) done")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            done.append(f"{sj.parent.name}: unreadable")
    return f"{format_size(folder_size(root))}" + (f", {'; '.join(done)}" if done else "")


def check_state_policy(root: Path | None, resume: bool, restart: bool) -> None:
    """Never discard a kept run state silently: an existing state needs ``resume`` (continue it) or
    ``restart`` (delete it and start again); raises :class:`RunStateError` otherwise."""
    if resume and restart:
        raise RunStateError("--resume and --restart exclude each other: continue the kept run state, or discard it")
    kept = kept_state(root)
    if kept is None or resume or restart:
        return
    raise RunStateError(f"an interrupted run left its state in {kept} ({describe_state(kept)}); add --resume to "
                        "continue it, or --restart to discard it and start again")


class Interrupted(KeyboardInterrupt):
    """A run was interrupted; ``state`` is the kept run state (or None) and ``size`` its bytes.

    ``signal``: the signal that stopped it (``SIGINT`` for Ctrl-C, ``SIGTERM`` for ``kill``,
    ``timeout``, SLURM or Kubernetes)."""

    def __init__(self, state: Path | None, size: int, resumable: bool, signal: str = "SIGINT"):
        super().__init__("interrupted")
        self.state = state
        self.size = size
        self.resumable = resumable
        self.signal = signal


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by the command line's SIGTERM handler, so a ``kill`` ends a run as
    Ctrl-C does: the run state is kept and the resume command printed."""
