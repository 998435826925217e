"""Data sources by name or path, and the token streams the algorithms consume.

A source is ``wiki`` or ``news`` (embedded), ``wikitext2``, ``c4`` or ``ptb`` (hub, through
``datasets``), or a local ``.txt`` file / ``.jsonl`` file with a ``text`` field per line.
Embedded and hub sources have disjoint ``train`` (calibration, fine-tuning) and ``test``
(evaluation) splits; a local file is used whole for whatever role it is given.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from .embedded import DataError, embedded_split
from .hub import c4_token_cap, load_hub_text

logger = logging.getLogger(__name__)

EMBEDDED = ("wiki", "news")
HUB = ("wikitext2", "c4", "ptb")
LOCAL_SUFFIXES = (".txt", ".jsonl")


def known_sources() -> str:
    return ", ".join((*EMBEDDED, *HUB)) + ", or a .txt/.jsonl file"


def check_source(source: str) -> None:
    """Fail fast (before any model work) on a source that cannot be read."""
    if source in EMBEDDED or source in HUB:
        return
    p = Path(source)
    if p.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"unknown data source {source!r}: use {known_sources()}")
    if not p.is_file():
        raise DataError(f"data file {source} does not exist")
    if p.stat().st_size == 0 or not "".join(read_local(p)).strip():
        raise DataError(f"data file {source} is empty")


def read_local(path: Path) -> list[str]:
    """Documents of a local file: the whole ``.txt``, or each ``text`` of a ``.jsonl``."""
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        bad = text.count("\ufffd") + sum(1 for c in text[:100_000] if c < " " and c not in "\n\r\t\f")
        if text and bad > 0.01 * min(len(text), 100_000):
            raise DataError(f"data file {path} is not UTF-8 text ({bad} undecodable or control characters); "
                            "give a text file")
        return [text]
    docs = []
    with path.open(encoding="utf-8", errors="strict") as fh:
        lines = _lines(fh, path)
        for n, line in lines:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "text" not in rec:
                raise DataError(f"{path}:{n} has no 'text' field")
            docs.append(str(rec["text"]))
    return docs


def _lines(fh, path: Path):
    try:
        yield from enumerate(fh, 1)
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start}); give a UTF-8 .jsonl") \
            from None


def documents(source: str, split: str) -> list[str]:
    """The documents of ``source`` for ``split`` (``train`` or ``test``)."""
    check_source(source)
    if source in EMBEDDED:
        return embedded_split(source, split)
    if source in HUB:
        return load_hub_text(source, split)
    return read_local(Path(source))


_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}


def token_stream(tokenizer, source: str, split: str, joiner: str = "\n\n") -> torch.Tensor:
    """All documents of ``source``/``split`` joined with ``joiner`` and tokenized once (1-D)."""
    key = (id(tokenizer), getattr(tokenizer, "name_or_path", ""), source, split, joiner)
    if key not in _TOKEN_CACHE:
        docs = documents(source, split)
        text = joiner.join(docs)
        if not text.strip():
            raise DataError(f"data source {source} ({split}) holds no text")
        ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
        _TOKEN_CACHE[key] = ids.long()
    return _TOKEN_CACHE[key]


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int, split: str = "train") -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets: ``(nsamples, seqlen)``.

    As SLEB/GPTQ sample: the split's text is joined and tokenized once, and each window starts at
    ``random.Random(seed).randint(0, n - seqlen - 1)``. The text must hold at least
    ``nsamples × seqlen`` tokens, so that the windows can cover distinct text.
    """
    ids = token_stream(tokenizer, source, split)
    need = nsamples * seqlen
    if ids.numel() < need + 1:
        raise DataError(
            f"data source {source} ({split}) has {ids.numel()} tokens, fewer than nsamples × seqlen = "
            f"{nsamples} × {seqlen} = {need}; lower --nsamples/--seqlen or give more text"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def heldout_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int, train_nsamples: int,
                    split: str = "train") -> torch.Tensor:
    """``nsamples`` windows that overlap neither each other nor the ``train_nsamples`` windows that
    :func:`calibration_windows` draws with the same ``seed`` (a held-in validation set).

    The same seeded generator continues after the training draws; a start whose window would
    overlap an earlier window is drawn again.
    """
    ids = token_stream(tokenizer, source, split)
    n = ids.numel()
    need = (nsamples + train_nsamples) * seqlen
    if n < 2 * need + 1:
        raise DataError(f"data source {source} ({split}) has {n} tokens, too few for {train_nsamples} training and "
                        f"{nsamples} validation windows of {seqlen} that do not overlap; lower val_nsamples or seqlen")
    rng = random.Random(seed)
    taken = [rng.randint(0, n - seqlen - 1) for _ in range(train_nsamples)]
    starts: list[int] = []
    tries = 0
    while len(starts) < nsamples:
        s = rng.randint(0, n - seqlen - 1)
        tries += 1
        if all(abs(s - t) >= seqlen for t in (*taken, *starts)):
            starts.append(s)
        elif tries > 1000 * nsamples:
            raise DataError(f"could not place {nsamples} validation windows beside the training windows in {source}")
    return torch.stack([ids[s : s + seqlen] for s in starts])


def eval_tokens(tokenizer, source: str, seqlen: int) -> torch.Tensor:
    """The evaluation token stream of ``source`` (GPTQ protocol; C4 capped at 256 · seqlen)."""
    ids = token_stream(tokenizer, source, "test", joiner=" " if source == "c4" else "\n\n")
    if source == "c4":
        ids = ids[: c4_token_cap(seqlen)]
    if ids.numel() < seqlen:
        raise DataError(f"evaluation data {source} has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return ids
