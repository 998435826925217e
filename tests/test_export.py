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
    model = _pruned_llama()
    a = get_adapter(model)
    apply_head_pruning(a, a.layers[0], [0, 2], [0, 1])
    with pytest.raises(ExportError, match="width-pruned"):
        export_gguf(model, None, tmp_path / "w.gguf")
    (tmp_path / "exists.gguf").write_bytes(b"")
    with pytest.raises(FileExistsError):
        export_gguf(_pruned_llama(), None, tmp_path / "exists.gguf")
    with pytest.raises(ExportError, match="dtype"):
        export_gguf(_pruned_llama(), None, tmp_path / "q.gguf", dtype="q4_0")
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
