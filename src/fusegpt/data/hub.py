"""The papers' evaluation sets through ``datasets``, processed exactly as GPTQ/SLEB do (§4).

Loading needs the hub; the processing functions take a ``datasets.Dataset`` (or any sequence of
records) so they are tested offline on local data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_EVAL_DOCS = 1100


def _require_datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("hub data sets need the 'hub' extra: pip install 'fusegpt[hub]'") from None
    return datasets


def wikitext2_text(records: Iterable[Mapping]) -> str:
    """WikiText-2 (raw) records → the GPTQ text: all ``text`` fields joined with blank lines."""
    return "\n\n".join(r["text"] for r in records)


def ptb_text(records: Iterable[Mapping]) -> str:
    """PTB records → GPTQ's text: ``sentence`` fields joined with a space (test split, not validation)."""
    return " ".join(r["sentence"] for r in records)


def c4_eval_text(records: Iterable[Mapping], n_docs: int = C4_EVAL_DOCS) -> str:
    """C4 validation records → SLEB's "c4" text: the first ``n_docs`` documents joined with a space.

    The caller truncates the tokens to ``256 · seqlen`` (see :func:`c4_token_cap`).
    """
    out = []
    for i, r in enumerate(records):
        if i >= n_docs:
            break
        out.append(r["text"])
    return " ".join(out)


def c4_token_cap(seqlen: int) -> int:
    return 256 * seqlen


def c4_train_docs(records: Iterable[Mapping]) -> list[str]:
    """C4 train shard records → document texts (calibration draws windows from them)."""
    return [r["text"] for r in records]


def load_hub_text(name: str, split: str) -> list[str]:
    """Download and process ``wikitext2``/``c4``/``ptb``; returns a list of documents.

    ``split`` is ``train`` (calibration) or ``test`` (evaluation; C4 uses its validation file).
    """
    datasets = _require_datasets()
    if name == "wikitext2":
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "train" else "test")
        return [wikitext2_text(ds)]
    if name == "ptb":
        ds = datasets.load_dataset("ptb_text_only", "penn_treebank", split="train" if split == "train" else "test")
        return [ptb_text(ds)]
    if name == "c4":
        if split == "train":
            ds = datasets.load_dataset("allenai/c4", data_files={"train": C4_TRAIN_FILE}, split="train")
            return c4_train_docs(ds)
        ds = datasets.load_dataset("allenai/c4", data_files={"validation": C4_VALIDATION_FILE}, split="validation")
        return [c4_eval_text(ds)]
    raise ValueError(f"unknown hub data set {name!r}")
