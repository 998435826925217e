"""What fusegpt may replace: only what it can prove it wrote.

Every folder fusegpt writes (a pruned checkpoint, a run state, a sweep folder) holds a marker,
``.fusegpt``: a small JSON record with a run id and the **manifest** of the files it wrote
(name, size, and the sha256 of every file up to :data:`HASH_LIMIT`). A folder may be replaced
(``--overwrite``) or a file in it rewritten only when every entry in the folder is in that
manifest and unchanged (a sub-folder with a valid marker of its own counts as fusegpt's too). A
file named ``report.json`` or ``.fusegpt`` that anyone could create proves nothing: a user's
``keep.txt`` beside it, or an edited ``report.md``, makes the folder theirs.

Single files carry their proof inside: a bench JSON has a ``"fusegpt"`` record with a run id, a
GGUF export the key ``fusegpt.run_id`` (:func:`fusegpt.checkpoint.gguf.export_gguf`).

Markers written before this scheme (a line of text, no manifest) are not trusted: such a folder
is refused with a message saying why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError, OutputNotWritableError

MARKER = ".fusegpt"
TOOL = "fusegpt"  # the marker's "tool" field (the tool, not the method of that name)
MARKER_FORMAT = 2
HASH_LIMIT = 16 * 2**20  # files up to this size are hashed; larger ones (weights) are checked by size


def new_run_id() -> str:
    return uuid.uuid4().hex


def umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def apply_umask(path: Path, directory: bool) -> None:
    """Give ``path`` the mode a plain ``mkdir``/``open`` would have (mkdtemp/mkstemp use 0700/0600)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def apply_umask_tree(root: Path) -> None:
    """:func:`apply_umask` on ``root`` and everything under it (some writers create 0600 files)."""
    apply_umask(root, directory=True)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            apply_umask(Path(dirpath) / d, directory=True)
        for f in filenames:
            apply_umask(Path(dirpath) / f, directory=False)


def stamp(path: Path) -> dict[str, Any]:
    """Size, and sha256 for files up to :data:`HASH_LIMIT`: what proves a file is unchanged."""
    size = path.stat().st_size
    out: dict[str, Any] = {"size": size}
    if size <= HASH_LIMIT:
        out["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@dataclass
class Marker:
    """The ``.fusegpt`` record of a folder: who wrote it and which files."""

    run_id: str
    kind: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    created: str = ""
    format: int = MARKER_FORMAT

    def to_json(self) -> str:
        return json.dumps({"tool": TOOL, "format": self.format, "kind": self.kind, "run_id": self.run_id,
                           "created": self.created, "files": self.files}, indent=1, sort_keys=True) + "\n"


def _walk_files(folder: Path) -> Iterable[Path]:
    """Every file under ``folder`` except its own marker, skipping sub-folders that have a marker of their own."""
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not (here / d / MARKER).is_file())
        for f in sorted(filenames):
            p = here / f
            if p != folder / MARKER:
                yield p


def write_marker(folder: Path, kind: str, run_id: str | None = None) -> Marker:
    """Write ``folder/.fusegpt`` listing every file now in ``folder`` (it proves fusegpt wrote them)."""
    m = Marker(run_id=run_id or new_run_id(), kind=kind,
               files={p.relative_to(folder).as_posix(): stamp(p) for p in _walk_files(folder)},
               created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    _write_text(folder / MARKER, m.to_json())
    return m


def read_marker(folder: Path) -> Marker | None:
    """The folder's marker; None when it has none, or one this scheme cannot trust (legacy text, foreign JSON)."""
    p = folder / MARKER
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(d, dict) or d.get("tool") != TOOL or not isinstance(d.get("files"), dict) \
            or not isinstance(d.get("run_id"), str):
        return None
    return Marker(run_id=d["run_id"], kind=str(d.get("kind", "")), files=d["files"], created=str(d.get("created", "")),
                  format=int(d.get("format", MARKER_FORMAT)))


def foreign_entry(folder: Path) -> str | None:
    """Why fusegpt may not replace ``folder``: the first entry it cannot prove it wrote, or None.

    An empty folder is fusegpt's to fill. Otherwise the folder needs a marker whose manifest lists
    every file, unchanged; sub-folders with their own marker are checked the same way.
    """
    entries = list(folder.iterdir())
    if not entries:
        return None
    marker = read_marker(folder)
    if marker is None:
        if (folder / MARKER).exists():
            return (f"its {MARKER} marker is not one this fusegpt wrote (written by an older fusegpt without a "
                    "list of its files, or by something else)")
        return f"it holds files fusegpt did not write (e.g. {sorted(e.name for e in entries)[0]})"
    listed = dict(marker.files)
    for p in _walk_files(folder):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink() or rel not in listed:
            return f"it holds {rel}, which fusegpt did not write"
        if stamp(p) != listed.pop(rel):
            return f"{rel} changed since fusegpt wrote it"
    for dirpath, dirnames, _ in os.walk(folder):
        for d in dirnames:
            sub = Path(dirpath) / d
            if (sub / MARKER).is_file():
                why = foreign_entry(sub)
                if why:
                    return f"{sub.relative_to(folder).as_posix()}: {why}"
    return None


def check_replaceable(folder: Path, what: str = "output folder") -> None:
    """Raise :class:`OutputExistsError` unless fusegpt can prove it wrote everything in ``folder``."""
    why = foreign_entry(folder)
    if why:
        raise OutputExistsError(f"refusing to replace {what} {folder}: {why}; choose another place, or move or delete "
                                "those files yourself")


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file beside it, then rename), with the umask's mode."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        apply_umask(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class OwnedFolder:
    """Files fusegpt writes *into* a folder that may hold other things (a sweep folder, a run folder that
    gets a ``report.md``): each target is refused up front unless it is new or fusegpt's unchanged copy,
    written atomically, and recorded in the folder's marker so a later run may replace it.

    ``kind``: the marker kind given to a folder that has no marker yet.
    """

    def __init__(self, folder: str | Path, kind: str):
        self.folder = Path(folder)
        self.kind = kind

    def _marker(self) -> Marker:
        return read_marker(self.folder) or Marker(run_id=new_run_id(), kind=self.kind,
                                                  created=datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def refusal(self, name: str) -> str | None:
        """Why ``name`` may not be (re)written, or None."""
        p = self.folder / name
        if not p.exists() and not p.is_symlink():
            return None
        if p.is_dir() or p.is_symlink():
            return f"{p} exists and is not a file fusegpt wrote"
        listed = (read_marker(self.folder) or Marker("", "")).files.get(name)
        if listed is None:
            return f"{p} exists and fusegpt did not write it"
        if stamp(p) != listed:
            return f"{p} changed since fusegpt wrote it"
        return None

    def check(self, names: Iterable[str]) -> None:
        """Refuse (before any work) when one of ``names`` may not be written."""
        for n in names:
            why = self.refusal(n)
            if why:
                raise OutputExistsError(f"refusing to write {why}; move it, or choose another folder")

    def write_text(self, name: str, text: str) -> Path:
        self.check([name])
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / name
        _write_text(path, text)
        self.record([name])
        return path

    def publish(self, staging: Path) -> list[Path]:
        """Move every file of ``staging`` into the folder (all checked first), recording them."""
        names = [p.name for p in sorted(staging.iterdir()) if p.is_file()]
        self.check(names)
        self.folder.mkdir(parents=True, exist_ok=True)
        out = []
        for n in names:
            apply_umask(staging / n, directory=False)
            os.replace(staging / n, self.folder / n)
            out.append(self.folder / n)
        self.record(names)
        return out

    def record(self, names: Iterable[str]) -> None:
        """Add (or refresh) ``names`` in the folder's marker."""
        m = self._marker()
        for n in names:
            m.files[n] = stamp(self.folder / n)
        _write_text(self.folder / MARKER, m.to_json())


def staging_dir(beside: Path) -> Path:
    """A fresh temporary folder beside ``beside`` (same file system), for :meth:`OwnedFolder.publish`."""
    beside.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".fusegpt-staging-", dir=beside))


def remove_staging(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- single files with their own proof
FILE_KEY = "fusegpt"


def file_record(kind: str, run_id: str | None = None) -> dict[str, Any]:
    """The record a JSON file carries to prove fusegpt wrote it (``{"fusegpt": {...}}``)."""
    return {"kind": kind, "run_id": run_id or new_run_id(),
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def check_file_output(path: str | Path, overwrite: bool, proven: bool | None = None, what: str = "output") -> Path:
    """Check a single output file before any work: new, or (with ``overwrite``) one fusegpt wrote.

    ``proven``: whether the existing file carries fusegpt's proof (the caller knows the format); None
    reads it as a JSON file with a ``"fusegpt"`` record.
    """
    out = Path(path).expanduser()
    if out.exists() or out.is_symlink():
        if not out.is_file() or out.is_symlink():
            raise OutputExistsError(f"{what} {out} exists and is not a plain file; choose another place")
        if not overwrite:
            raise OutputExistsError(f"{what} {out} exists; pass --overwrite to replace it")
        ok = json_file_is_ours(out) if proven is None else proven
        if not ok:
            raise OutputExistsError(f"refusing to replace {out}: fusegpt did not write it; choose another place or "
                                    "delete it yourself")
    check_writable(out.parent)
    return out


def nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(folder: Path) -> None:
    """Create and remove a probe file in ``folder`` (or its nearest existing ancestor)."""
    place = nearest_existing(folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=".fusegpt-probe-", dir=place)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputNotWritableError(f"cannot write in {place} ({e.strerror or e}); choose another --output "
                                     "or fix the folder's permissions") from None


def json_file_is_ours(path: Path) -> bool:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(d, dict) and isinstance(d.get(FILE_KEY), dict) and isinstance(d[FILE_KEY].get("run_id"), str)


def write_json_file(path: Path, obj: dict[str, Any]) -> Path:
    """Write a JSON result file atomically (its ``"fusegpt"`` record is the caller's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, json.dumps(obj, indent=2) + "\n")
    return path
