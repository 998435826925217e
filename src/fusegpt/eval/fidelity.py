"""Fidelity to the dense teacher: how closely a pruned model still *is* the model it was pruned from.

Perplexity misses what users lose first: depth pruning breaks generation (arithmetic, long answers) long
before it moves multiple-choice accuracy. So beside perplexity:

* ``kl``: mean over tokens of KL(teacher ‖ model) of the next-token distributions, on the GPTQ-protocol
  windows of an evaluation text (the first ``max_tokens``);
* ``top1``: the share of those positions where both predict the same next token;
* ``gen_match_mean`` / ``gen_match_median``: from ``prompts`` fixed prompts of ``prompt_len`` tokens taken
  at evenly spaced offsets of the same text, both models continue greedily for ``gen_len`` tokens; the
  number of tokens that match the teacher's before the first difference (``gen_len`` = identical).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def _device(model: nn.Module) -> torch.device:
    return next(p for p in model.parameters() if not p.is_meta).device


@torch.no_grad()
def _greedy(model: nn.Module, prompt: torch.Tensor, n: int) -> list[int]:
    out = model.generate(prompt.to(_device(model)), max_new_tokens=n, do_sample=False, use_cache=True,
                         pad_token_id=0, min_new_tokens=n)
    return out[0, prompt.shape[1]:].tolist()


@torch.no_grad()
def fidelity(model: nn.Module, teacher: nn.Module, tokens: torch.Tensor, seqlen: int, max_tokens: int | None = None,
             prompts: int = 16, prompt_len: int = 32, gen_len: int = 32, batch_size: int = 1,
             desc: str = "fidelity") -> dict[str, Any]:
    """KL and top-1 agreement to ``teacher`` on ``tokens`` (1-D), and the greedy generation match."""
    was = model.training, teacher.training
    model.eval()
    teacher.eval()
    stream = tokens[:max_tokens] if max_tokens else tokens
    n = stream.numel() // seqlen
    windows = stream[: n * seqlen].view(n, seqlen)
    kl_sum, agree, count = 0.0, 0, 0
    for ids in tqdm(windows.split(batch_size), desc=f"{desc} KL", unit="batch", leave=False):
        t = teacher(ids.to(_device(teacher))).logits.float()
        s = model(ids.to(_device(model))).logits.float().to(t.device)
        log_p, log_q = F.log_softmax(t, -1), F.log_softmax(s, -1)
        kl_sum += float((log_p.exp() * (log_p - log_q)).sum(-1).sum())
        agree += int((t.argmax(-1) == s.argmax(-1)).sum())
        count += t.shape[0] * t.shape[1]
    matches = []
    if prompts and stream.numel() > prompt_len:
        step = max(1, (stream.numel() - prompt_len) // prompts)
        for i in tqdm(range(prompts), desc=f"{desc} generation", unit="prompt", leave=False):
            prompt = stream[i * step: i * step + prompt_len].view(1, -1)
            a, b = _greedy(teacher, prompt, gen_len), _greedy(model, prompt, gen_len)
            m = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            matches.append(m)
    model.train(was[0])
    teacher.train(was[1])
    return {"kl": kl_sum / max(count, 1), "top1": agree / max(count, 1), "tokens": count,
            "gen_match_mean": statistics.mean(matches) if matches else None,
            "gen_match_median": statistics.median(matches) if matches else None,
            "gen_prompts": len(matches), "gen_len": gen_len, "prompt_len": prompt_len}
