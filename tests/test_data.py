"""Data sources: embedded splits never overlap, local files, seeded windows, hub processing offline."""

import json

import pytest
import torch

from fusegpt.data import (
    DataError,
    calibration_windows,
    check_source,
    documents,
    embedded_split,
    eval_tokens,
    hub,
)


@pytest.mark.parametrize("name", ["wiki", "news"])
def test_embedded_splits_are_disjoint_and_nonempty(name):
    train, test = embedded_split(name, "train"), embedded_split(name, "test")
    assert len(train) > 3 * len(test) > 0
    assert not set(train) & set(test)


def test_wiki_text_is_clean():
    text = "\n\n".join(embedded_split("wiki", "test")[:3])
    assert "'''" not in text and "[[" not in text and "{{" not in text
    assert text.startswith("= ")


def test_local_sources(tmp_path, toy_tokenizer):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world " * 200)
    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"doc {i} " * 20}) for i in range(10)) + "\n")
    assert documents(str(txt), "train") == [txt.read_text()]
    assert len(documents(str(jl), "test")) == 10
    w = calibration_windows(toy_tokenizer, str(txt), nsamples=4, seqlen=32, seed=0)
    assert w.shape == (4, 32) and w.dtype == torch.long


def test_bad_sources(tmp_path, toy_tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        check_source(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        check_source(str(empty))
    with pytest.raises(DataError, match="unknown data source"):
        check_source("wikitext103")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match="no 'text' field"):
        check_source(str(bad))
    short = tmp_path / "short.txt"
    short.write_text("x" * 100)
    with pytest.raises(DataError, match="fewer than nsamples × seqlen"):
        calibration_windows(toy_tokenizer, str(short), nsamples=4, seqlen=32, seed=0)


def test_calibration_is_seeded(tmp_path, toy_tokenizer):
    f = tmp_path / "c.txt"
    f.write_text("".join(chr(97 + i % 26) for i in range(5000)))
    a = calibration_windows(toy_tokenizer, str(f), 8, 64, seed=1)
    b = calibration_windows(toy_tokenizer, str(f), 8, 64, seed=1)
    c = calibration_windows(toy_tokenizer, str(f), 8, 64, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hub_processing_offline():
    datasets = pytest.importorskip("datasets")
    wt = datasets.Dataset.from_dict({"text": ["", " = Title = \n", " Some text .\n"]})
    assert hub.wikitext2_text(wt) == "\n\n = Title = \n\n\n Some text .\n"
    ptb = datasets.Dataset.from_dict({"sentence": ["a b", "c d"]})
    assert hub.ptb_text(ptb) == "a b c d"
    c4 = datasets.Dataset.from_dict({"text": [f"doc{i}" for i in range(1200)]})
    joined = hub.c4_eval_text(c4)
    assert joined.split(" ") == [f"doc{i}" for i in range(hub.C4_EVAL_DOCS)]
    assert hub.c4_token_cap(2048) == 256 * 2048
    assert hub.c4_train_docs(c4)[:2] == ["doc0", "doc1"]


def test_eval_tokens_local(tmp_path, toy_tokenizer):
    f = tmp_path / "e.txt"
    f.write_text("abc " * 50)
    ids = eval_tokens(toy_tokenizer, str(f), seqlen=16)
    assert ids.ndim == 1 and ids.numel() == 200
    with pytest.raises(DataError, match="fewer than one window"):
        eval_tokens(toy_tokenizer, str(f), seqlen=1000)
