"""Our GGUF files in the real llama.cpp (through llama-cpp-python): they load, tokenize as transformers
does, and give the same next-token logits as the model we exported (depth and width, each dtype).

Skipped, with the reason, when llama-cpp-python is absent (an error instead when
``FUSEGPT_REQUIRE_LLAMACPP=1``, as ``.ci/run`` sets); ``scripts/setup.sh`` (what CI runs) builds it
from source once per machine (``scripts/setup_llamacpp.sh``).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fusegpt.blocks import remove_blocks
from fusegpt.models import get_adapter

from .conftest import BPE_TEXT, tiny_model

pytest.importorskip("gguf")
if os.environ.get("FUSEGPT_REQUIRE_LLAMACPP") == "1":  # CI: a missing runtime is a failure, not a skip
    import llama_cpp
else:
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed: run scripts/setup_llamacpp.sh (builds llama.cpp, "
        "~5-10 min)")
pytestmark = pytest.mark.usefixtures("single_thread")

# per dtype: (max relative error of the logits, min top-1 agreement over the 64 positions); measured on
# these tiny random models: f32 2e-4 / 1.0, f16 8e-4 / 1.0, bf16 6e-3 / 0.98, q8_0 1.3e-2 / 0.95
LIMITS = {"f32": (1e-3, 1.0), "f16": (3e-3, 0.98), "bf16": (1.5e-2, 0.95), "q8_0": (3e-2, 0.9)}


def _run_llama_cpp(path, ids: list[int]) -> np.ndarray:  # noqa: D401
    """llama.cpp's logits at every position of ``ids`` (one thread, context = len(ids))."""
    llm = llama_cpp.Llama(str(path), n_ctx=max(64, len(ids)), n_batch=len(ids), n_threads=1, n_threads_batch=1,
                          logits_all=True, verbose=False, seed=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def _compare(model, path, ids: list[int]) -> tuple[float, float]:
    """``(relative error, top-1 agreement)`` of llama.cpp's logits against ``model``'s."""
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].double().numpy()
    got = _run_llama_cpp(path, ids)
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    return rel, top1


def _depth_pruned(family: str = "llama"):
    extra = {"use_sliding_window": False} if family == "qwen2" else {}
    model = tiny_model(family, vocab_size=300, seed=1, **extra)
    if family == "qwen2":  # non-zero q/k/v biases, so the test sees whether they are written and read
        for block in get_adapter(model).layers:
            for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    remove_blocks(get_adapter(model), [1, 4])
    return model


def _width_pruned():
    from fusegpt.width import apply_ffn_pruning, apply_head_pruning

    model = _depth_pruned()
    a = get_adapter(model)
    apply_head_pruning(a, a.layers[0], [0, 2], [0, 1])
    apply_head_pruning(a, a.layers[2], [2, 3], [1])
    apply_ffn_pruning(a, a.layers[1], list(range(0, 96, 2)))
    apply_ffn_pruning(a, a.layers[3], list(range(64)))
    return model


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("kind", ["depth", "width", "qwen2"])
def test_llama_cpp_runs_our_file_with_the_same_logits(tmp_path, bpe_tokenizer, kind, dtype):
    from fusegpt.checkpoint.gguf import export_gguf, gguf_arch

    model = {"depth": _depth_pruned, "width": _width_pruned, "qwen2": lambda: _depth_pruned("qwen2")}[kind]()
    assert gguf_arch(model) == {"depth": "llama", "width": "deci", "qwen2": "qwen2"}[kind]
    out = export_gguf(model, bpe_tokenizer, tmp_path / f"{kind}-{dtype}.gguf", dtype=dtype)
    ids = bpe_tokenizer(BPE_TEXT[:300])["input_ids"][:64]
    rel, top1 = _compare(model, out, ids)
    max_rel, min_top1 = LIMITS[dtype]
    assert rel < max_rel and top1 >= min_top1, (kind, dtype, rel, top1)


def test_llama_cpp_tokenizes_as_transformers(tmp_path, bpe_tokenizer):
    """The pre-tokenizer name we write makes llama.cpp split text exactly as the HF tokenizer does."""
    from fusegpt.checkpoint.gguf import export_gguf

    out = export_gguf(_depth_pruned(), bpe_tokenizer, tmp_path / "t.gguf")
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    try:
        for text in (BPE_TEXT, "  two  spaces, 'quotes' and\ttabs\n\nnew lines 1234567 ✅"):
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == bpe_tokenizer(text)["input_ids"]
    finally:
        llm.close()


@pytest.mark.real
def test_pruned_embedded_model_in_llama_cpp(tmp_path):
    """SmolLM2 after ShortGPT (depth) and SlimGPT (width): llama.cpp loads both with the right tokenizer and
    gives transformers' logits on real text."""
    from fusegpt import api, config_for
    from fusegpt.checkpoint.gguf import export_gguf
    from fusegpt.loading import load_model

    text = ("The Eiffel Tower was opened in 1889 for the World's Fair in Paris. It was the tallest structure in "
            "the world for forty-one years, and today it is visited by millions of people every year.")
    calib = dict(calib_source="news", nsamples=2, seqlen=128)
    for method, cfg in (("shortgpt", config_for("shortgpt", sparsity=0.1, **calib)),
                        ("slimgpt", config_for("slimgpt", sparsity=0.2, **calib))):
        model, tok = load_model(None)
        model, _ = api.compress(model, tok, cfg)
        out = export_gguf(model, tok, tmp_path / f"{method}.gguf", dtype="f16")
        llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
        ids = tok(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
        llm.close()
        rel, top1 = _compare(model, out, ids)
        assert rel < 1e-2 and top1 >= 0.95, (method, rel, top1)


# k-quants, measured on the 256-wide random tiny model below (rows a multiple of the 256-value super-block),
# relative error / top-1 agreement over seeds 1-3: q6_k 0.052-0.053 / 0.86-0.94, q5_k_m 0.085-0.099 /
# 0.67-0.89, q4_k_m 0.17-0.19 / 0.59-0.70 (q8_0: 0.017 / 0.94-1.0). A random model's logits are nearly
# flat, so top-1 flips easily; the relative error is the sharp bound (about 1.5x the measured one).
K_LIMITS = {"q6_k": (0.08, 0.75), "q5_k_m": (0.14, 0.55), "q4_k_m": (0.28, 0.45)}


@pytest.mark.parametrize("dtype", sorted(K_LIMITS))
def test_k_quant_files_load_in_llama_cpp_and_agree(tmp_path, bpe_tokenizer, dtype):
    """The k-quants users download, made by llama.cpp's own quantiser from our f16 export."""
    from gguf import GGMLQuantizationType, GGUFReader

    from fusegpt.checkpoint.gguf import RUN_ID_KEY, export_gguf

    model = tiny_model("llama", vocab_size=300, seed=1, hidden_size=256, intermediate_size=512,
                       num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    out = export_gguf(model, bpe_tokenizer, tmp_path / f"k-{dtype}.gguf", dtype=dtype)
    reader = GGUFReader(str(out))
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    k_types = {GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K}
    assert kinds["blk.0.ffn_up.weight"] in k_types and RUN_ID_KEY in reader.fields  # quantised, still ours
    assert not list(tmp_path.glob(".*tmp"))
    ids = bpe_tokenizer(BPE_TEXT[:300])["input_ids"][:64]
    rel, top1 = _compare(model, out, ids)
    max_rel, min_top1 = K_LIMITS[dtype]
    assert rel < max_rel and top1 >= min_top1, (dtype, rel, top1)


def test_uniform_width_model_is_an_ordinary_llama_in_llama_cpp(tmp_path, bpe_tokenizer, toy_tokenizer):
    from fusegpt import api, config_for
    from fusegpt.checkpoint.gguf import export_gguf, gguf_arch

    model = tiny_model("llama", vocab_size=300, seed=1)
    model, _ = api.compress(model, toy_tokenizer, config_for("slimgpt", sparsity=0.3, nsamples=2, seqlen=32,
                                                             layout="uniform", align=32))
    assert gguf_arch(model) == "llama" and model.config.intermediate_size % 32 == 0
    out = export_gguf(model, bpe_tokenizer, tmp_path / "u.gguf", dtype="f16")
    ids = bpe_tokenizer(BPE_TEXT[:300])["input_ids"][:64]
    rel, top1 = _compare(model, out, ids)
    assert rel < LIMITS["f16"][0] and top1 >= LIMITS["f16"][1], (rel, top1)


def test_bench_runtime_llamacpp(tmp_path, bpe_tokenizer, capsys):
    from fusegpt.checkpoint import save_pruned
    from fusegpt.cli import main

    save_pruned(tiny_model("llama", vocab_size=300), bpe_tokenizer, tmp_path / "dense")
    save_pruned(_depth_pruned(), bpe_tokenizer, tmp_path / "depth")
    out = tmp_path / "b.json"
    assert main(["bench", "--runtime", "llamacpp", "--model", str(tmp_path / "dense"), "--model", str(tmp_path / "depth"),
                 "--dtypes", "f16,q8_0", "--rounds", "2", "--output", str(out)]) == 0
    assert "pp512" in capsys.readouterr().out
    res = __import__("json").loads(out.read_text())
    assert res["runtime"] == "llamacpp" and res["models"][1]["layers"] == 4
    cell = res["models"][1]["cells"]["q8_0"]
    assert cell["pp"]["n"] == 2 and cell["tg"]["median"] > 0 and cell["pp_speedup"] > 0
    assert res["models"][1]["ideal_speedup_blocks"] == pytest.approx(1.5)


def test_calibrate_a_llama_cpp_cost_model(tmp_path, bpe_tokenizer, monkeypatch, capsys):
    from fusegpt.checkpoint import save_pruned
    from fusegpt.cli import main
    from fusegpt.loading import model_config
    from fusegpt.speedmodel import load_cost_model

    monkeypatch.setenv("FUSEGPT_CACHE", str(tmp_path / "cache"))
    save_pruned(tiny_model("llama", vocab_size=300, intermediate_size=128), bpe_tokenizer, tmp_path / "dense")
    assert main(["bench", "--calibrate", "--runtime", "llamacpp", "--dtypes", "q8_0", "--model", str(tmp_path / "dense"),
                 "--rounds", "1", "--prompt-tokens", "32", "--gen-tokens", "4"]) == 0
    assert "cost model: llamacpp q8_0" in capsys.readouterr().out
    cm = load_cost_model(model_config(str(tmp_path / "dense")), "llamacpp", "q8_0", 1)
    assert {s["name"] for s in cm.samples} >= {"dense", "shallow", "irregular ffn"} and cm.unit == 32
