"""Zero-shot through lm-evaluation-harness: local task definitions over JSONL the test writes,
the offline proxies' construction, and the CLI (tiny model, real HF byte tokenizer)."""

import json
import sys

import pytest

from fusegpt.cli import main
from fusegpt.eval import proxies
from fusegpt.eval.zeroshot import ZeroShotError, expand_tasks, zeroshot

from .conftest import byte_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

pytest.importorskip("lm_eval")

MC_DOCS = [
    {"query": "The sky is", "choices": ["blue", "loud", "heavy"], "label": 0},
    {"query": "Fish live in", "choices": ["trees", "water", "fire"], "label": 1},
    {"query": "Snow is", "choices": ["hot", "green", "cold"], "label": 2},
    {"query": "Two plus two is", "choices": ["four", "nine", "one"], "label": 0},
    {"query": "The sun rises in the", "choices": ["west", "east", "sea"], "label": 1},
]


def _write_tasks(root):
    """Two local lm-eval tasks (``dataset_path: json``): multiple choice and last-word."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (root / "lw.jsonl").write_text("".join(json.dumps({"context": f"one two three {w} and again", "target": w}) + "\n"
                                           for w in ("apple", "river", "stone", "cloud")))
    (root / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_target: label
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    (root / "tiny_lw.yaml").write_text(f"""task: tiny_lw
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'lw.jsonl'}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
""")
    return root


@pytest.fixture
def tiny_lm():
    return tiny_model("llama", vocab_size=259, max_position_embeddings=512), byte_tokenizer()


def test_local_tasks_acc_and_acc_norm(tiny_lm, tmp_path):
    model, tok = tiny_lm
    tasks = _write_tasks(tmp_path / "tasks")
    res = zeroshot(model, tok, "tiny_mc,tiny_lw", limit=4, batch_size=2, include_path=tasks)
    mc, lw = res["tasks"]["tiny_mc"], res["tasks"]["tiny_lw"]
    assert 0.0 <= mc["acc"] <= 1.0 and 0.0 <= mc["acc_norm"] <= 1.0 and mc["n"] == 4 and not mc["proxy"]
    assert 0.0 <= lw["acc"] <= 1.0 and lw["perplexity"] > 1.0 and "acc_norm" not in lw
    assert res["average"]["acc"] == pytest.approx((mc["acc"] + lw["acc"]) / 2)
    assert res["lm_eval_version"] and res["limit"] == 4 and res["num_fewshot"] is None
    assert not model.training


def test_cli_eval_tasks_json_and_report(tiny_checkpoint, tmp_path, capsys):
    src, text = tiny_checkpoint
    path = tmp_path / "mi"  # a folder fusegpt wrote, with its report (eval --tasks adds to it)
    assert main(["-q", "prune", "--model", str(src), "--method", "mi", "--sparsity", "0.3", "--calib", str(text),
                 "--nsamples", "2", "--seqlen", "16", "--no-eval", "--output", str(path)]) == 0
    capsys.readouterr()
    tasks = _write_tasks(tmp_path / "tasks")
    assert main(["eval", "--model", str(path), "--tasks", "tiny_mc", "--include-path", str(tasks), "--limit", "3",
                 "--num-fewshot", "0", "--batch-size", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["ppl"] == {} and res["zeroshot"]["tasks"]["tiny_mc"]["n"] == 3
    assert res["zeroshot"]["num_fewshot"] == 0
    rep = json.loads((path / "report.json").read_text())
    assert rep["method"] == "mi" and rep["extra"]["zeroshot"]["tiny_mc"]["settings"]["limit"] == 3
    assert main(["-q", "prune", "--model", str(src), "--method", "mi", "--sparsity", "0.3", "--calib", str(text),
                 "--nsamples", "2", "--seqlen", "16", "--no-eval", "--output", str(path), "--overwrite"]) == 0


def test_unknown_task_and_missing_extra(tiny_lm, monkeypatch, tmp_path):
    import fusegpt.eval.zeroshot as zs

    model, tok = tiny_lm
    lm_eval, hflm, task_manager = zs._lm_eval()
    # skip the scan of lm-eval's thousands of built-in YAMLs (slow); the error path is the same
    monkeypatch.setattr(zs, "_lm_eval", lambda: (lm_eval, hflm, lambda **kw: task_manager(
        **{**kw, "include_defaults": False})))
    with pytest.raises(ZeroShotError, match="unknown lm-eval task.*wiki_lastword_proxy"):
        zeroshot(model, tok, "no_such_task_xyz", include_path=_write_tasks(tmp_path / "t"))
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ZeroShotError, match=r"fusegpt\[eval\]"):
        zeroshot(model, tok, "piqa")


def test_task_aliases():
    assert expand_tasks("paper") == ["piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge"]
    assert expand_tasks("slimgpt")[-2:] == ["boolq", "openbookqa"]
    assert expand_tasks("proxies,piqa,piqa") == [*proxies.PROXY_TASKS, "piqa"]


def test_proxies_built_deterministically_and_run_through_the_harness(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEGPT_CACHE", str(tmp_path))
    model, tok = tiny_lm
    res = zeroshot(model, tok, "proxies", limit=2, batch_size=4)
    assert set(res["tasks"]) == set(proxies.PROXY_TASKS)
    assert res["tasks"]["news_continuation_proxy"]["chance"] == 0.25
    assert all(r["proxy"] and r["n"] == 2 for r in res["tasks"].values())
    root = proxies.proxy_dir()
    assert root.parent == tmp_path / "proxies" and res["proxy_data_version"] == root.name
    assert '"dataset_path": "json"' in (root / "wiki_lastword_proxy.yaml").read_text()

    def read(name):
        return [json.loads(x) for x in (root / f"{name}.jsonl").read_text().splitlines()]

    lw = proxies.build_lastword()
    assert lw == read("wiki_lastword_proxy") and len(lw) >= 200  # a second build gives the same items
    for d in lw:
        assert d["target"].isalpha() and d["target"].lower() in d["context"].lower()
        assert 40 <= len(d["context"].split()) + 1 <= 150
    nc = proxies.build_continuation()
    assert nc == read("news_continuation_proxy") and len(nc) == proxies.MAX_DOCS
    assert all(len(d["choices"]) == 4 and len(set(d["choices"])) == 4 for d in nc)
    assert min([d["label"] for d in nc].count(i) for i in range(4)) > 80  # labels spread over the 4 slots
    assert all(d["choices"][d["label"]] not in d["context"] for d in nc)


@pytest.mark.real
def test_dense_embedded_model_beats_chance_on_proxies():
    from fusegpt.loading import load_model

    model, tok = load_model()
    res = zeroshot(model, tok, "proxies", limit=12, batch_size=4)
    assert res["tasks"]["wiki_lastword_proxy"]["acc"] >= 0.25  # chance ~0 (open vocabulary)
    assert res["tasks"]["news_continuation_proxy"]["acc_norm"] > 0.25  # chance 0.25


@pytest.mark.parametrize("method", ["slimgpt", "mi"])
def test_pruned_checkpoints_width_and_depth(method, tiny_checkpoint, tmp_path, capsys):
    """Width-pruned folders load through load_pruned, depth-pruned through transformers; both evaluate."""
    path, text = tiny_checkpoint
    out = tmp_path / method
    assert main(["-q", "prune", "--model", str(path), "--method", method, "--sparsity", "0.3", "--calib", str(text),
                 "--nsamples", "2", "--seqlen", "32", "--no-eval", "--output", str(out)]) == 0
    tasks = _write_tasks(tmp_path / "tasks")
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--tasks", "tiny_mc", "--include-path", str(tasks), "--limit", "2",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["zeroshot"]["tasks"]["tiny_mc"]["n"] == 2
    assert "tiny_mc" in json.loads((out / "report.json").read_text())["extra"]["zeroshot"]
