"""What is particular to the non-LLaMA families: LLaVA's towers, GPT-2's Conv1D, Phi-3's fused rows,
Gemma-2's soft-capping, OPT-350m's projections."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from fusegpt.blocks import remove_blocks
from fusegpt.checkpoint import save_pruned
from fusegpt.models import get_adapter

from .conftest import TINY_IMAGE_TOKEN, load_stock, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread is much faster


def _image_inputs(model):
    n_img = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    g = torch.Generator().manual_seed(2)
    ids = torch.cat([torch.full((1, n_img), TINY_IMAGE_TOKEN), torch.randint(1, TINY_IMAGE_TOKEN, (1, 12), generator=g)], 1)
    return ids, torch.randn(1, 3, 30, 30, generator=g)


def test_llava_prunes_language_tower_only(tmp_path):
    model = tiny_model("llava")
    vision = {k: v.clone() for k, v in model.state_dict().items() if "language_model" not in k and "lm_head" not in k}
    a = get_adapter(model)
    assert a.decoder is model.model.language_model and a.config is model.config.text_config
    remove_blocks(a, [0, 3])
    assert model.config.text_config.num_hidden_layers == 4 == len(model.model.language_model.layers)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in vision.items())  # vision tower + projector untouched
    ids, pixels = _image_inputs(model)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels).logits
        gen = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert ref.shape == (1, ids.shape[1], model.config.text_config.vocab_size) and gen.shape[1] == ids.shape[1] + 3
    save_pruned(model, None, tmp_path / "llava")
    reloaded = load_stock(tmp_path / "llava", "llava")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, pixel_values=pixels).logits, ref, rtol=0, atol=0)


def test_llava_uses_text_family_adapter():
    from fusegpt.models.gemma import Gemma2Adapter

    model = tiny_model("llava", text={})
    assert type(get_adapter(model)).__name__ == "LlavaLlamaAdapter"
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from .conftest import tiny_config

    cfg = LlavaConfig(vision_config=model.config.vision_config, text_config=tiny_config("gemma2"),
                      image_token_index=TINY_IMAGE_TOKEN)
    a = get_adapter(LlavaForConditionalGeneration(cfg))
    assert isinstance(a, Gemma2Adapter) and len(a.norm_modules(a.layers[0])) == 4
    cfg = LlavaConfig(vision_config=model.config.vision_config, text_config=tiny_config("opt"),
                      image_token_index=TINY_IMAGE_TOKEN)
    with pytest.raises(ValueError, match="'opt' language tower is not supported"):
        get_adapter(LlavaForConditionalGeneration(cfg))


def test_gpt2_conv1d_layout(tmp_path, input_ids):
    from fusegpt.models.gpt2 import Conv1DLinear

    model = tiny_model("gpt2")
    a = get_adapter(model)
    block = a.layers[0]
    qkv = a.linear_roles(block)["qkv_proj"]
    assert isinstance(qkv, Conv1DLinear) and qkv.weight.shape == (3 * 64, 64)
    assert block.state_dict()["attn.c_attn.weight"].shape == (64, 3 * 64)  # Conv1D layout outside
    # a plain nn.Linear handed to set_linear (a merged fusion result) is wrapped, function unchanged
    plain = nn.Linear(64, 3 * 64)
    a.set_linear(block, "qkv_proj", plain)
    assert isinstance(block.attn.c_attn, Conv1DLinear)
    torch.testing.assert_close(block.attn.c_attn(torch.ones(2, 64)), plain(torch.ones(2, 64)))
    # state dicts round-trip in Conv1D layout
    copy = tiny_model("gpt2", seed=5)
    get_adapter(copy)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(copy(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)
    save_pruned(model, None, tmp_path / "g")
    with safe_open(str(tmp_path / "g" / "model.safetensors"), "pt") as f:
        assert f.get_slice("transformer.h.0.attn.c_attn.weight").get_shape() == [64, 3 * 64]


def test_gpt2_refuses_layer_scaled_attention():
    a = get_adapter(tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        remove_blocks(a, [1])


def test_phi3_fused_rows():
    a = get_adapter(tiny_model("phi3"))
    block = a.layers[0]
    s = a.qkv_slices(block)
    d = a.head_dim
    assert (s["q_proj"].stop, s["k_proj"].stop - s["k_proj"].start, s["v_proj"].stop) == (4 * d, 2 * d, 8 * d)
    assert s["v_proj"].stop == block.self_attn.qkv_proj.out_features
    assert a.gate_up_slices(block) == {"gate_proj": slice(0, 96), "up_proj": slice(96, 192)}
    # the slices are what the stock attention uses: zeroing the key rows changes nothing but keys
    x = torch.randn(1, 5, 64)
    qkv = block.self_attn.qkv_proj(x)
    torch.testing.assert_close(qkv[..., s["q_proj"]], x @ block.self_attn.qkv_proj.weight[s["q_proj"]].T)
    with pytest.raises(NotImplementedError, match="Phi-3"):
        a.set_attention_geometry(block, 2, 2)


def test_gemma2_softcap_and_norms(input_ids):
    a = get_adapter(tiny_model("gemma2", final_logit_softcapping=0.5))
    with torch.no_grad():
        logits = a.logits(a.run_blocks(a.embed(input_ids)))
    assert logits.abs().max() <= 0.5
    assert len(a.norm_modules(a.layers[0])) == 4
    assert a.model.config.layer_types[:2] == ["sliding_attention", "full_attention"]


def test_opt_350m_layout(input_ids, tmp_path):
    """Post-LN blocks and 32-wide embeddings projected in and out (as OPT-350m)."""
    model = tiny_model("opt", word_embed_proj_dim=32, do_layer_norm_before=False)
    a = get_adapter(model)
    assert a.decoder.project_in is not None and a.decoder.final_layer_norm is None
    with torch.no_grad():
        ref = model(input_ids).logits
        torch.testing.assert_close(a.logits(a.run_blocks(a.embed(input_ids))), ref, rtol=0, atol=0)
    assert "gate_proj" not in a.linear_roles(a.layers[0])


@pytest.mark.parametrize("family", ["llava", "gemma2"])
def test_cli_prune_and_eval(family, bpe_tokenizer, tmp_path, capsys):
    """The CLI loads LLaVA (image-text-to-text class) and Gemma-2 (eager attention), prunes, evaluates."""
    import json

    from fusegpt.cli import main

    from .conftest import BPE_TEXT

    model = tiny_model(family, **({"text": {"vocab_size": 300}} if family == "llava" else {"vocab_size": 300}))
    save_pruned(model, bpe_tokenizer, tmp_path / "in")
    text = tmp_path / "text.txt"  # a small local source: tokenizing the embedded corpora takes longer
    text.write_text(BPE_TEXT * 8)
    rc = main(["prune", "--model", str(tmp_path / "in"), "--method", "mi", "--sparsity", "0.2", "--nsamples", "2",
               "--seqlen", "32", "--calib", str(text), "--output", str(tmp_path / "out"), "--no-eval",
               "--max-memory", "4GB"])
    assert rc == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "out"), "--data", str(text), "--seqlen", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_layers"] == 4
    reloaded = load_stock(tmp_path / "out", family)
    assert type(reloaded).__name__ == type(model).__name__


def test_gemma3_multimodal_prunes_its_text_tower_only(tmp_path):
    """Gemma 3 4B+ (Gemma3ForConditionalGeneration): the text tower's adapter, the vision side untouched,
    layer_types kept consistent, stock reload with an image gives identical logits."""
    from fusegpt.models.gemma import Gemma3TextAdapter

    model = tiny_model("gemma3")
    a = get_adapter(model)
    assert isinstance(a, Gemma3TextAdapter) and a.decoder is model.model.language_model
    vision = {k: v.clone() for k, v in model.state_dict().items() if "language_model" not in k and "lm_head" not in k}
    types = list(model.config.text_config.layer_types)
    remove_blocks(a, [1, 2])
    assert model.config.text_config.num_hidden_layers == 4
    assert model.config.text_config.layer_types == [t for i, t in enumerate(types) if i not in (1, 2)]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in vision.items())
    g = torch.Generator().manual_seed(2)
    ids = torch.cat([torch.tensor([[125]]), torch.full((1, 4), TINY_IMAGE_TOKEN), torch.tensor([[126]]),
                     torch.randint(1, 120, (1, 10), generator=g)], 1)
    pixels = torch.randn(1, 3, 28, 28, generator=g)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pixels).logits
        text_only = model(input_ids=ids[:, 6:]).logits
    assert torch.isfinite(ref).all() and ref.shape[1] == ids.shape[1]
    save_pruned(model, None, tmp_path / "g3")
    back = load_stock(tmp_path / "g3", "gemma3")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, pixel_values=pixels).logits, ref, rtol=0, atol=0)
        torch.testing.assert_close(back(input_ids=ids[:, 6:]).logits, text_only, rtol=0, atol=0)


def test_cli_prunes_a_gemma3_multimodal_checkpoint(tmp_path):
    """The CLI loads a Gemma3ForConditionalGeneration folder with its auto class, prunes its text tower and
    saves a checkpoint stock transformers reloads."""
    from transformers import AutoModelForImageTextToText

    from fusegpt.cli import main

    from .conftest import byte_tokenizer

    model = tiny_model("gemma3", text={"vocab_size": 259})
    path = tmp_path / "g3"
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["alpha beta gamma delta"] * 400))
    assert main(["prune", "--model", str(path), "--method", "shortgpt", "--sparsity", "0.34", "--calib", str(text),
                 "--set", "nsamples=2", "--set", "seqlen=32", "--output", str(tmp_path / "out"), "--no-eval"]) == 0
    back = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert back.config.text_config.num_hidden_layers == 3 and len(back.config.text_config.layer_types) == 3
