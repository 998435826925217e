"""Speed and memory bench: tiny models, warm-up + repeats, speed-ups against the ideal."""

import json

import pytest

from fusegpt.cli import main
from fusegpt.eval.speed import bench_model, bench_models, bench_to_markdown, format_table

from .conftest import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def test_bench_model_rows():
    model = tiny_model("llama")
    r = bench_model(model, batch_sizes=(1, 2), lengths=(4, 8), decode_tokens=2, warmup=1, repeats=2)
    assert r["layers"] == 6 and r["params"] > r["block_params"] > 0 and r["weights_mb"] > 0
    assert [(x["batch"], x["length"]) for x in r["rows"]] == [(1, 4), (1, 8), (2, 4), (2, 8)]
    for x in r["rows"]:
        assert x["prefill_s"]["n"] == 2 and x["prefill_s"]["min"] <= x["prefill_s"]["median"] <= x["prefill_s"]["max"]
        assert x["decode_tokens_per_s"]["median"] > 0 and x["peak_memory_mb"] > 0


def test_lengths_past_the_context_are_skipped():
    r = bench_model(tiny_model("llama"), batch_sizes=(1,), lengths=(8, 300), decode_tokens=2, warmup=0, repeats=1)
    assert [x["length"] for x in r["rows"]] == [8]


def test_bench_models_speedup_vs_ideal():
    models = {"dense": tiny_model("llama"), "pruned": tiny_model("llama", num_hidden_layers=3)}
    res = bench_models(["dense", "pruned"], batch_sizes=(1,), lengths=(8,), decode_tokens=2, warmup=0, repeats=1,
                       device="cpu", loader=lambda spec, dev: (models[spec], None))
    dense, pruned = res["models"]
    assert dense["ideal_speedup_blocks"] == 1.0 and pruned["ideal_speedup_blocks"] == 2.0  # 6 -> 3 blocks
    assert dense["rows"][0]["prefill_speedup"] == 1.0 and pruned["rows"][0]["prefill_speedup"] > 0
    assert "ideal" in format_table(res) and "| pruned | 3 |" in bench_to_markdown(res)
    assert res["settings"]["repeats"] == 1 and "torch" in res["versions"]


def test_cli_bench_two_models(tiny_checkpoint, tmp_path, capsys):
    path, _ = tiny_checkpoint
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(path), "--model", str(path), "--batch-sizes", "1", "--lengths", "8",
                 "--decode-tokens", "2", "--warmup", "0", "--repeats", "2", "--device", "cpu",
                 "--output", str(out)]) == 0
    assert "decode tok/s" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert len(res["models"]) == 2 and res["models"][1]["ideal_speedup_blocks"] == 1.0
    assert main(["bench", "--model", str(path), "--batch-sizes", "x"]) == 2


@pytest.mark.real
def test_embedded_model_bench():
    from fusegpt.loading import load_model

    model, _ = load_model()
    r = bench_model(model, batch_sizes=(1,), lengths=(32,), decode_tokens=4, warmup=1, repeats=2)
    assert r["layers"] == 30 and 130e6 < r["params"] < 140e6
    assert r["rows"][0]["decode_tokens_per_s"]["median"] > 1
