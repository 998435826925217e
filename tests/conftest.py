"""Tiny random models built from configs (no network, seconds each)."""

from __future__ import annotations

import pytest
import torch

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def tiny_config(model_type: str = "llama", **overrides):
    """A seeded tiny config of ``model_type`` (llama, mistral, qwen2, qwen3)."""
    from transformers import AutoConfig

    if model_type in EXTRA_FAMILIES:
        return _extra_config(model_type, **overrides)
    kw = dict(TINY)
    if model_type == "qwen3":
        kw["head_dim"] = 16
    if model_type == "mistral":
        kw["sliding_window"] = 32
    if model_type == "qwen2":
        kw.update(use_sliding_window=True, sliding_window=32, max_window_layers=3)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if model_type in EXTRA_FAMILIES:
        return _extra_model(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), attn_implementation="sdpa")
    return model.eval()


class ToyTokenizer:
    """Whitespace-free byte tokenizer for the tiny models (ids < 128), enough for data tests."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text, return_tensors=None, **_):
        ids = [b % 127 + 1 for b in text.encode("utf-8")]
        t = torch.tensor([ids])
        return {"input_ids": t}

    def encode(self, text, **_):
        return [b % 127 + 1 for b in text.encode("utf-8")]

    def save_pretrained(self, path):
        pass


FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def toy_tokenizer():
    return ToyTokenizer()


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 128, (2, 40), generator=g)


# ---------------------------------------------------------------- families beyond the LLaMA layout
# (issue 6) Gemma/Gemma-2, Phi-3, OPT, GPT-2 and LLaVA spell their config keys differently; same
# sizes as TINY. FAMILIES stays the LLaMA-layout set that the older tests assume.
EXTRA_FAMILIES = ["gemma", "gemma2", "gemma3_text", "phi3", "opt", "gpt2", "llava", "gemma3"]
ALL_FAMILIES = [*FAMILIES, *EXTRA_FAMILIES]
TINY_IMAGE_TOKEN = 127  # LLaVA's image placeholder id in the tiny vocabulary


def _extra_config(model_type: str, **overrides):
    from transformers import AutoConfig

    base = {k: TINY[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                 "max_position_embeddings", "tie_word_embeddings")}
    if model_type == "llava":
        from transformers import CLIPVisionConfig, LlavaConfig

        text = tiny_config("llama", **overrides.pop("text", {}))
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=30, patch_size=15, projection_dim=32)
        return LlavaConfig(vision_config=vision, text_config=text, image_token_index=TINY_IMAGE_TOKEN,
                           projector_hidden_act="gelu", vision_feature_layer=-1, **overrides)
    if model_type == "gemma3":  # the multimodal model: a Gemma 3 text tower beside a tiny SigLIP
        from transformers import Gemma3Config, SiglipVisionConfig

        text = tiny_config("gemma3_text", **overrides.pop("text", {}))
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=28, patch_size=14)
        return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=125,
                            eoi_token_index=126, image_token_index=TINY_IMAGE_TOKEN, tie_word_embeddings=False,
                            **overrides)
    if model_type in ("gemma", "gemma2", "gemma3_text", "phi3"):
        base.update(intermediate_size=TINY["intermediate_size"], num_key_value_heads=2, rms_norm_eps=1e-6,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "gemma":
        base.update(head_dim=16)
    if model_type == "gemma2":
        base.update(head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
                    final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    if model_type == "gemma3_text":  # 5 local : 1 global as the real models, two RoPE bases
        base.update(head_dim=16, sliding_window=16, query_pre_attn_scalar=16, sliding_window_pattern=3,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    if model_type == "phi3":
        base.update(sliding_window=16, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    if model_type == "opt":
        base.update(ffn_dim=TINY["intermediate_size"], word_embed_proj_dim=TINY["hidden_size"],
                    pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0)
    if model_type == "gpt2":
        base = dict(vocab_size=TINY["vocab_size"], n_embd=64, n_layer=TINY["num_hidden_layers"], n_head=4, n_inner=96,
                    n_positions=TINY["max_position_embeddings"], bos_token_id=0, eos_token_id=0,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def _extra_model(model_type: str, **overrides):
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    config = _extra_config(model_type, **overrides)
    attn = "eager" if model_type == "gemma2" else "sdpa"  # Gemma-2 soft-caps attention logits: no SDPA
    if model_type == "llava":
        return LlavaForConditionalGeneration._from_config(config, attn_implementation=attn).eval()
    if model_type == "gemma3":
        from transformers import Gemma3ForConditionalGeneration

        return Gemma3ForConditionalGeneration._from_config(config, attn_implementation=attn).eval()
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


@pytest.fixture(params=ALL_FAMILIES)
def any_family(request) -> str:
    """Every registered family, including those without the LLaMA module layout."""
    return request.param


def byte_tokenizer():
    """A real (saveable) HF fast tokenizer: byte-level, no merges, 259 ids; pair with vocab_size=259."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for sp in ("<s>", "</s>", "<unk>"):
        vocab[sp] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A saved tiny llama (vocab 259) with a byte tokenizer, plus a local text file long enough to calibrate."""
    model = tiny_model("llama", vocab_size=259)
    tok = byte_tokenizer()
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    text = tmp_path / "text.txt"
    words = ["alpha", "beta", "gamma", "delta", "pruning", "model", "block", "fusion"]
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (3000,), generator=g).tolist()))
    return path, text


def load_stock(path, model_type: str):
    """Reload a saved tiny checkpoint with stock transformers only (the class a user would use)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, LlavaForConditionalGeneration

    attn = "eager" if model_type == "gemma2" else "sdpa"
    cls = {"llava": LlavaForConditionalGeneration, "gemma3": AutoModelForImageTextToText}.get(model_type,
                                                                                            AutoModelForCausalLM)
    return cls.from_pretrained(path, attn_implementation=attn).eval()


@pytest.fixture
def single_thread():
    """One torch thread for the test: tiny models on a busy 2-core machine run ~50× faster than with
    two spinning OpenMP threads (measured in tests/test_speed.py: 61 s → 1.3 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- a real (tiny) tokenizer
BPE_TEXT = ("Pruning removes whole blocks of a language model; fusion folds what they knew into their neighbours. "
            "The year 2024 had 366 days, and 12345 + 678 = 13023.\nNew lines, tabs\tand emoji 🙂 survive. ") * 4


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A byte-level BPE tokenizer trained on a few lines (300 ids, three special tokens), saveable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([BPE_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")


@pytest.fixture
def text_file(tmp_path):
    """A local calibration text (1,500 seeded words) for the tiny models, as a path string."""
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "pruning", "model", "block", "fusion"]
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(words[i] for i in torch.randint(0, 8, (1500,), generator=g).tolist()))
    return str(path)


def one_line_error(rc: int, err: str, message: str, code: int = 2) -> None:
    """A CLI refusal as users see it: exit ``code``, no traceback, one ``fusegpt: error:`` line holding ``message``."""
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("fusegpt: error:")]
    assert rc == code, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and message in lines[0], err
