"""The block store of layer-wise execution: decoder blocks live off the compute device and come in while used.

A :class:`BlockOffloader` attached to a model keeps every decoder block's tensors in a *store*
(CPU memory, or one safetensors file per block in a folder) and leaves the block's modules in
the model with their parameters on the ``meta`` device. The adapter brings a block onto the
compute device for the time it runs (``run_block``) or while an algorithm edits it
(``adapter.using(indices, write=True)``); edited blocks are written back to the store.

Choices: the module structure stays in memory (fusion may replace a block's linears while it is
onloaded; the new tensors go to the store by name); stored tensors keep their dtype; a block
loaded from a checkpoint is cast to the model's dtype when it comes in. Disk stores write with
safetensors (a tensor shared inside a block is written once per name).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError

logger = logging.getLogger(__name__)

STORAGES = ("cpu", "disk")
_UID = "_fusegpt_uid"
_ATTR = "_fusegpt_offload"


def _tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``block`` by qualified name (shared ones once per name)."""
    out = {n: p for n, p in block.named_parameters(remove_duplicate=False)}
    out.update({n: b for n, b in block.named_buffers(remove_duplicate=False) if b is not None})
    return out


def _assign(block: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = block.get_submodule(mod_name) if mod_name else block
    if leaf in mod._parameters:
        old = mod._parameters[leaf]
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    else:
        mod._buffers[leaf] = value


class BlockOffloader:
    """Keeps the decoder blocks of one model in a store; see the module doc.

    ``storage``: ``"cpu"`` (tensors in host memory; the usual choice when the compute device is
    a GPU) or ``"disk"`` (one safetensors file per block under ``folder``; a temporary folder
    when not given, removed by :meth:`close`).
    """

    def __init__(self, device: str | torch.device, storage: str = "disk", folder: str | Path | None = None):
        if storage not in STORAGES:
            raise ConfigError(f"offload storage must be one of {', '.join(STORAGES)}, got {storage!r}")
        self.device = torch.device(device)
        self.storage = storage
        self._own_folder = folder is None and storage == "disk"
        self.folder = Path(tempfile.mkdtemp(prefix="fusegpt-offload-")) if self._own_folder else (
            Path(folder).expanduser() if folder else None)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        if self._own_folder:  # a temporary store goes when the offloader does (or at exit)
            weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        self._mem: dict[int, dict[str, torch.Tensor]] = {}
        self._files: dict[int, Path] = {}
        self._sources: dict[int, dict[str, tuple[Path, str]]] = {}
        self._source_dtype: torch.dtype | None = None
        self._resident: dict[int, int] = {}  # uid -> nesting count
        self._uids = itertools.count()
        self.loads = 0  # blocks brought to the device so far (tests and logs)

    # ------------------------------------------------------------------ bookkeeping
    def uid(self, block: nn.Module) -> int:
        if not hasattr(block, _UID):
            setattr(block, _UID, next(self._uids))
        return getattr(block, _UID)

    def is_resident(self, block: nn.Module) -> bool:
        return self.uid(block) in self._resident

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in self._mem.values() for t in d.values())

    # ------------------------------------------------------------------ store
    def _put(self, uid: int, tensors: dict[str, torch.Tensor]) -> None:
        if self.storage == "cpu":
            self._mem[uid] = {n: t.detach().to("cpu") for n, t in tensors.items()}
        else:
            from safetensors.torch import save_file

            seen: set[int] = set()
            flat = {}
            for n, t in tensors.items():
                t = t.detach().to("cpu").contiguous()
                if t.data_ptr() in seen and t.numel():
                    t = t.clone()
                seen.add(t.data_ptr())
                flat[n] = t
            path = self.folder / f"block-{uid}.safetensors"
            tmp = path.with_suffix(".tmp")
            save_file(flat, str(tmp))
            tmp.replace(path)
            self._files[uid] = path
        self._sources.pop(uid, None)

    def _get(self, uid: int, names: Iterable[str]) -> dict[str, torch.Tensor]:
        if uid in self._mem:
            return self._mem[uid]
        from safetensors import safe_open

        if uid in self._files:
            out = {}
            with safe_open(str(self._files[uid]), framework="pt", device="cpu") as f:
                for n in f.keys():
                    out[n] = f.get_tensor(n)
            return out
        if uid in self._sources:
            src = self._sources[uid]
            out = {}
            by_file: dict[Path, list[str]] = {}
            for n in names:
                if n in src:
                    by_file.setdefault(src[n][0], []).append(n)
            for file, ns in by_file.items():
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for n in ns:
                        t = f.get_tensor(src[n][1])
                        out[n] = t.to(self._source_dtype) if self._source_dtype and t.is_floating_point() else t
            return out
        raise KeyError(f"block {uid} has no stored tensors")

    def forget(self, keep: Iterable[nn.Module]) -> None:
        """Drop the stored tensors of every block not in ``keep`` (after blocks were removed)."""
        alive = {self.uid(b) for b in keep}
        for uid in set(self._mem) | set(self._files) | set(self._sources):
            if uid not in alive:
                self._mem.pop(uid, None)
                self._sources.pop(uid, None)
                path = self._files.pop(uid, None)
                if path is not None:
                    path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ moving
    def offload(self, block: nn.Module, write: bool = True) -> None:
        """Store ``block`` (when ``write`` or never stored) and put its tensors on ``meta``."""
        uid = self.uid(block)
        for m in block.modules():  # caches derived from the weights (FusedLinear) would outlive them
            clear = getattr(m, "clear_cache", None)
            if callable(clear):
                clear()
        if write or not (uid in self._mem or uid in self._files or uid in self._sources):
            self._put(uid, _tensors(block))
        for n, t in _tensors(block).items():
            _assign(block, n, torch.empty_like(t, device="meta"))
        self._resident.pop(uid, None)

    def onload(self, block: nn.Module) -> None:
        """Bring ``block``'s tensors onto the compute device."""
        uid = self.uid(block)
        if uid in self._resident:
            return
        names = _tensors(block)
        stored = self._get(uid, names)
        missing = [n for n, t in names.items() if n not in stored and t.is_meta]
        if missing:
            raise KeyError(f"stored block {uid} lacks {missing[:3]}")
        for n, t in stored.items():
            _assign(block, n, t.to(self.device, non_blocking=False))
        self._resident[uid] = 0
        self.loads += 1

    @contextlib.contextmanager
    def use(self, blocks: Iterable[nn.Module], write: bool = False) -> Iterator[None]:
        """Keep ``blocks`` on the device inside the ``with``; written back on exit when ``write``."""
        blocks = list(blocks)
        mine = [b for b in blocks if not self.is_resident(b)]
        for b in mine:
            self.onload(b)
        for b in blocks:
            self._resident[self.uid(b)] += 1
        try:
            yield
        finally:
            for b in blocks:
                uid = self.uid(b)
                if uid in self._resident:
                    self._resident[uid] -= 1
            for b in mine:
                self.offload(b, write=write)

    def close(self) -> None:
        """Delete the block files this offloader wrote (and its folder, when temporary)."""
        for path in self._files.values():
            path.unlink(missing_ok=True)
        self._files.clear()
        if self._own_folder and self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def offloader_of(model: nn.Module) -> BlockOffloader | None:
    """The store a layer-wise model was loaded with (how it is loaded, not run state), or None."""
    return getattr(model, _ATTR, None)


def set_offloader(model: nn.Module, off: BlockOffloader) -> None:
    setattr(model, _ATTR, off)
