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

import shutil
from dataclasses import dataclass
from pathlib import Path

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


class Interrupted(KeyboardInterrupt):
    """A run was interrupted; ``state`` is the kept run state (or None) and ``size`` its bytes."""

    def __init__(self, state: Path | None, size: int, resumable: bool):
        super().__init__("interrupted")
        self.state = state
        self.size = size
        self.resumable = resumable
