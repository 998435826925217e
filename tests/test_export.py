"""GGUF export: a pruned tiny LLaMA round-trips through transformers' GGUF loader (weights and tokenizer)."""

from __future__ import annotations

import pytest
import torch

from fusegpt.blocks import remove_blocks
from fusegpt.checkpoint import save_pruned
from fusegpt.models import get_adapter

from .conftest import tiny_model

pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("single_thread")

SAMPLE = "Blocks fuse into neighbours in 2025 🙂\n<|im_start|>user hi<|im_end|>"


def _pruned_llama(vocab: int = 300, **kw):
    model = tiny_model("llama", vocab_size=vocab, **kw)
    remove_blocks(get_adapter(model), [1, 4])
    return model


def _reload(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_permutation_is_what_transformers_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from fusegpt.checkpoint.gguf import permute_rotary

    w = torch.randn(2 * 16, 64)  # 2 K/V heads of 16
    back = LlamaTensorProcessor()._reverse_permute_weights(permute_rotary(w, 2).numpy(), 4, 2)
    torch.testing.assert_close(torch.from_numpy(back), w)


def test_round_trip_f32(tmp_path, bpe_tokenizer):
    import gguf

    from fusegpt.checkpoint.gguf import export_gguf

    model = _pruned_llama()
    out = export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 4
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    back, tok = _reload(out)
    assert back.config.num_hidden_layers == 4
    ids = bpe_tokenizer(SAMPLE, return_tensors="pt")["input_ids"]
    assert tok(SAMPLE)["input_ids"] == ids[0].tolist()
    assert tok.decode(ids[0]) == bpe_tokenizer.decode(ids[0])
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_round_trip_f16_and_tied_head(tmp_path, bpe_tokenizer):
    from fusegpt.checkpoint.gguf import export_gguf

    model = _pruned_llama(tie_word_embeddings=True)
    out = export_gguf(model, bpe_tokenizer, tmp_path / "m16.gguf", dtype="f16")
    back, _ = _reload(out)
    assert back.config.tie_word_embeddings
    ids = bpe_tokenizer(SAMPLE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=5e-3)


def test_round_trip_qwen2_with_biases(tmp_path, bpe_tokenizer):
    import gguf

    from fusegpt.checkpoint.gguf import ExportError, export_gguf

    model = tiny_model("qwen2", vocab_size=300, use_sliding_window=False)
    a = get_adapter(model)
    with torch.no_grad():  # make the q/k/v biases matter
        for block in a.layers:
            for role in ("q_proj", "k_proj", "v_proj"):
                a.linear_roles(block)[role].bias.normal_(0, 0.5)
    remove_blocks(a, [2])
    out = export_gguf(model, bpe_tokenizer, tmp_path / "q.gguf")
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert reader.fields["qwen2.block_count"].contents() == 5
    back, _ = _reload(out)
    assert back.config.model_type == "qwen2"
    ids = bpe_tokenizer(SAMPLE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(ExportError, match="sliding"):
        export_gguf(tiny_model("qwen2", vocab_size=300), None, tmp_path / "sw.gguf")


def _spm_tokenizer():
    """A LLaMA-2-style tokenizer (BPE, byte fallback, '▁' for spaces) trained on a few lines."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    from .conftest import BPE_TEXT

    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tk.train_from_iterator([BPE_TEXT], trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                           show_progress=False))
    m = json.loads(tk.to_str())["model"]
    merges = [tuple(x.split(" ")) if isinstance(x, str) else tuple(x) for x in m["merges"]]
    return LlamaTokenizer(vocab=m["vocab"], merges=merges)


def test_round_trip_sentencepiece_tokenizer(tmp_path):
    import gguf

    from fusegpt.checkpoint.gguf import export_gguf

    tok = _spm_tokenizer()
    model = _pruned_llama(vocab=400)
    out = export_gguf(model, tok, tmp_path / "spm.gguf")
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[tok.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE and types[0] == gguf.TokenType.CONTROL
    back, tok2 = _reload(out)
    text = SAMPLE + "  double  spaces, Ünïcödé and 🦀"
    ids = tok(text)["input_ids"]
    assert tok2(text)["input_ids"] == ids
    assert tok2.decode(ids) == tok.decode(ids)
    t = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(back(t).logits, model(t).logits, rtol=0, atol=0)


def test_refusals(tmp_path, bpe_tokenizer):
    from fusegpt.checkpoint.gguf import ExportError, export_gguf
    from fusegpt.width import apply_head_pruning

    with pytest.raises(ExportError, match="this model is 'gpt2'"):
        export_gguf(tiny_model("gpt2"), None, tmp_path / "g.gguf")
    qwen = tiny_model("qwen2", use_sliding_window=False)
    qa = get_adapter(qwen)
    apply_head_pruning(qa, qa.layers[0], [0, 1], [0])
    with pytest.raises(ExportError, match="'deci'.*no q/k/v biases"):
        export_gguf(qwen, None, tmp_path / "w.gguf")
    (tmp_path / "exists.gguf").write_bytes(b"")
    with pytest.raises(FileExistsError):
        export_gguf(_pruned_llama(), None, tmp_path / "exists.gguf")
    with pytest.raises(ExportError, match="dtype must be one of .*q4_k_m"):
        export_gguf(_pruned_llama(), None, tmp_path / "q.gguf", dtype="q4_k")
    assert not (tmp_path / "w.gguf").exists() and not list(tmp_path.glob(".*.tmp"))


def test_cli_export(tmp_path, bpe_tokenizer, capsys):
    from fusegpt.cli import main

    model = _pruned_llama()
    save_pruned(model, bpe_tokenizer, tmp_path / "ckpt")
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--gguf", str(tmp_path / "o.gguf")]) == 0
    assert "4 blocks" in capsys.readouterr().out
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--gguf", str(tmp_path / "o.gguf")]) == 2
    assert "exists" in capsys.readouterr().err
    back, _ = _reload(tmp_path / "o.gguf")
    ids = torch.tensor([[5, 9, 200, 17]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.real
def test_embedded_model_pruned_round_trip(tmp_path):
    """The issue's check: prune the embedded SmolLM2 by 2 blocks (ShortGPT), export, reload, same logits."""
    from fusegpt import api, config_for
    from fusegpt.checkpoint.gguf import export_gguf
    from fusegpt.loading import load_model

    model, tok = load_model(None)
    model, report = api.compress(model, tok, config_for("shortgpt", sparsity=0.06, nsamples=2, seqlen=128))
    assert model.config.num_hidden_layers == 28 and len(report.removed) == 2
    out = export_gguf(model, tok, tmp_path / "smol.gguf")
    back, tok2 = _reload(out)
    text = "The capital of France is Paris. In 1889 the Eiffel Tower opened.\n<|im_start|>user\nhi<|im_end|>"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert tok2(text)["input_ids"] == ids[0].tolist()
    assert tok2.chat_template == tok.chat_template
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------ pre-tokenizer names
def test_pre_tokenizer_name_is_one_llama_cpp_knows(tmp_path, bpe_tokenizer):
    """Plain ByteLevel (GPT-2's regex) is 'gpt-2' (llama.cpp refuses the old 'gpt2'); forced and carried names win."""
    import gguf

    from fusegpt.checkpoint.gguf import PRE_KEY, ExportError, export_gguf, resolve_pre
    from fusegpt.checkpoint.gguf.pretokenizers import KNOWN_PRE

    assert "gpt2" not in KNOWN_PRE and {"gpt-2", "smollm", "llama-bpe", "qwen2"} <= KNOWN_PRE
    assert resolve_pre(bpe_tokenizer) == ("gpt-2", "pre-tokenizer regex")
    model = _pruned_llama()
    setattr(model.config, PRE_KEY, "smollm")
    assert resolve_pre(bpe_tokenizer, model.config)[0] == "smollm"
    out = export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf", pre="llama-bpe")
    assert gguf.GGUFReader(str(out)).fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    with pytest.raises(ExportError, match="'gpt2' is not a pre-tokenizer llama.cpp knows.*smollm"):
        export_gguf(model, bpe_tokenizer, tmp_path / "bad.gguf", pre="gpt2")
    assert not (tmp_path / "bad.gguf").exists()


def test_unknown_pre_tokenizer_is_refused_with_the_choices(tmp_path):
    """A pre-tokenizer that is neither in llama.cpp's hash table nor one of its regex sets: error, no file."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fusegpt.checkpoint.gguf import ExportError, export_gguf

    from .conftest import BPE_TEXT

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("[a-z]+|[^a-z]"), "isolated"),
                                                pre_tokenizers.ByteLevel(use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([BPE_TEXT], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    with pytest.raises(ExportError, match="probe hash .*pass --pre NAME.*gpt-2.*smollm"):
        export_gguf(_pruned_llama(), tok, tmp_path / "u.gguf")
    assert not list(tmp_path.iterdir())
    export_gguf(_pruned_llama(), tok, tmp_path / "u.gguf", pre="gpt-2")  # the way out the message names


def test_gguf_source_carries_its_pre_name_into_checkpoints(tmp_path, monkeypatch, bpe_tokenizer):
    """Converting a .gguf model records its tokenizer.ggml.pre; a checkpoint saved from it keeps the name."""
    from fusegpt import loading
    from fusegpt.checkpoint.gguf import PRE_KEY, export_gguf

    src = export_gguf(_pruned_llama(), bpe_tokenizer, tmp_path / "src.gguf", pre="starcoder")
    monkeypatch.setenv("FUSEGPT_CACHE", str(tmp_path / "cache"))
    model, tok = loading.load_model(str(src))
    assert getattr(model.config, PRE_KEY) == "starcoder"
    save_pruned(model, tok, tmp_path / "ckpt")
    again, _ = loading.load_model(str(tmp_path / "ckpt"))
    assert getattr(again.config, PRE_KEY) == "starcoder"


# ------------------------------------------------------------------------------ width-pruned: 'deci'
def _width_pruned_llama():
    from fusegpt.width import apply_ffn_pruning, apply_head_pruning

    model = _pruned_llama()
    a = get_adapter(model)
    apply_head_pruning(a, a.layers[0], [0, 2], [0, 1])       # 2 of 4 heads, both K/V heads
    apply_head_pruning(a, a.layers[2], [2, 3], [1])          # one whole K/V group
    apply_ffn_pruning(a, a.layers[1], list(range(0, 96, 2)))  # 48 channels: down_proj rows not a multiple of 32
    return model


def test_width_pruned_model_is_written_as_deci_with_per_layer_widths(tmp_path, bpe_tokenizer):
    import gguf

    from fusegpt.checkpoint.gguf import export_gguf

    model = _width_pruned_llama()
    out = export_gguf(model, bpe_tokenizer, tmp_path / "w.gguf", dtype="q8_0")
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.architecture"].contents() == "deci"
    assert r.fields["deci.attention.head_count"].contents() == [2, 4, 2, 4]
    assert r.fields["deci.attention.head_count_kv"].contents() == [2, 2, 1, 2]
    assert r.fields["deci.feed_forward_length"].contents() == [96, 48, 96, 96]
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.1.ffn_down.weight"] == "F16"  # 48 % 32 fallback
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    shapes = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    assert shapes["blk.0.attn_q.weight"] == [64, 32] and shapes["blk.2.attn_k.weight"] == [64, 16]


@pytest.mark.parametrize("dtype", ["bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_quantised_export_dequantises_close_to_the_weights(tmp_path, dtype):
    """Each offered type writes its GGML type, and the stored weight reads back within that type's error."""
    import gguf
    from gguf.quants import dequantize

    from fusegpt.checkpoint.gguf import export_gguf, permute_rotary

    model = _pruned_llama()
    out = export_gguf(model, None, tmp_path / f"m-{dtype}.gguf", dtype=dtype)
    r = gguf.GGUFReader(str(out))
    t = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    assert t.tensor_type.name == dtype.upper()
    back = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(64, 64).copy())
    want = permute_rotary(get_adapter(model).linear_roles(get_adapter(model).layers[0])["q_proj"].weight, 4)
    rel = (back - want).norm() / want.norm()
    assert rel < {"bf16": 0.005, "q8_0": 0.01, "q5_1": 0.05, "q5_0": 0.06, "q4_1": 0.1, "q4_0": 0.12}[dtype]
