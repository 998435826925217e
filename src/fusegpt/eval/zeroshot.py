"""Zero-shot accuracy through lm-evaluation-harness, on the model already in memory.

The released harness is a dependency (extra ``eval``), never a fork, and its version is recorded
with every result (USERS.md #7). Tasks are lm-eval task names: the papers' ``piqa``,
``winogrande``, ``hellaswag``, ``arc_easy``, ``arc_challenge`` (FuseGPT) plus ``boolq``,
``openbookqa`` (SlimGPT) need their data sets from the hub (or its local cache); the offline
proxies of :mod:`fusegpt.eval.proxies` and any local task folder (``include_path``) do not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import FusegptError
from .proxies import CHANCE, PROXY_TASKS, data_version, write_proxy_tasks

logger = logging.getLogger(__name__)

FUSEGPT_TASKS = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge")
SLIMGPT_TASKS = (*FUSEGPT_TASKS, "boolq", "openbookqa")
TASK_ALIASES = {"paper": FUSEGPT_TASKS, "fusegpt": FUSEGPT_TASKS, "slimgpt": SLIMGPT_TASKS, "proxies": PROXY_TASKS}
METRICS = ("acc", "acc_norm", "perplexity")


class ZeroShotError(FusegptError, ValueError):
    """lm-eval is missing, a task is unknown, or its data cannot be read; the message says what to do."""


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ZeroShotError(
            f"zero-shot evaluation needs lm-evaluation-harness: pip install 'fusegpt[eval]' ({e})"
        ) from None
    return lm_eval, HFLM, TaskManager


def expand_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"piqa,arc_easy"`` or a list, with aliases (``paper``, ``slimgpt``, ``proxies``) expanded."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    out: list[str] = []
    for n in names:
        for t in TASK_ALIASES.get(n, (n,)):
            if t not in out:
                out.append(t)
    if not out:
        raise ZeroShotError("give at least one task")
    return out


def lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm-eval")
    except PackageNotFoundError:
        return None


def _clean(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) or math.isinf(x) else x


def summarize(results: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """lm-eval's ``results`` → ``{task: {acc, acc_stderr, acc_norm, acc_norm_stderr, n, ...}}`` + average."""
    per_task: dict[str, dict[str, Any]] = {}
    n_samples = results.get("n-samples", {})
    for t in tasks:
        r = results["results"].get(t, {})
        row: dict[str, Any] = {}
        for m in METRICS:
            if f"{m},none" in r:
                row[m] = _clean(r[f"{m},none"])
                row[f"{m}_stderr"] = _clean(r.get(f"{m}_stderr,none"))
        row["n"] = n_samples.get(t, {}).get("effective")
        row["proxy"] = t in PROXY_TASKS
        if t in CHANCE:
            row["chance"] = CHANCE[t]
        per_task[t] = row
    avg: dict[str, float | None] = {}
    for m in ("acc", "acc_norm"):
        vals = [r[m] for r in per_task.values() if r.get(m) is not None]
        avg[m] = sum(vals) / len(vals) if vals else None
    # papers average acc_norm where a task reports it, acc otherwise (FuseGPT/SlimGPT tables)
    mixed = [r.get("acc_norm", r.get("acc")) for r in per_task.values()]
    mixed = [v for v in mixed if v is not None]
    avg["acc_norm_else_acc"] = sum(mixed) / len(mixed) if mixed else None
    return {"tasks": per_task, "average": avg}


def zeroshot(
    model,
    tokenizer,
    tasks: str | Sequence[str] = FUSEGPT_TASKS,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    include_path: str | Path | Sequence[str | Path] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on the in-memory ``model``; acc/acc_norm per task and their averages.

    ``limit`` caps the examples per task (lm-eval's ``--limit``; a result with a limit is not
    comparable with published numbers). ``include_path``: folders of local task YAMLs.
    Returns ``{"tasks": {...}, "average": {...}, "num_fewshot", "limit", "lm_eval_version", ...}``.
    """
    lm_eval, HFLM, TaskManager = _lm_eval()
    names = expand_tasks(tasks)
    paths: list[str] = []
    if include_path is not None:
        paths += [str(p) for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path)]
    proxies = tuple(t for t in names if t in PROXY_TASKS)
    if proxies:
        paths.append(str(write_proxy_tasks(names=proxies)))
    local = set(proxies)
    for p in paths:
        local |= {f.stem for f in Path(p).glob("*.y*ml")}
    # the built-in index (thousands of YAMLs) is only scanned when a task needs it
    needs_defaults = any(t not in local for t in names)
    tm = TaskManager(include_path=paths or None, include_defaults=needs_defaults)
    unknown = [t for t in names if t not in tm.all_tasks]
    if unknown:
        raise ZeroShotError(f"unknown lm-eval task(s): {', '.join(unknown)}; built-in names include "
                            f"{', '.join(SLIMGPT_TASKS)}; offline proxies: {', '.join(PROXY_TASKS)}")
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    logger.info("lm-eval %s: %s (fewshot %s, limit %s)", lm_eval_version(), ",".join(names), num_fewshot, limit)
    try:
        res = lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
            log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed, bootstrap_iters=1000,
        )
    except (ConnectionError, OSError) as e:
        hub = [t for t in names if t not in local]
        raise ZeroShotError(
            f"could not load the data of {', '.join(hub) or 'a task'} ({type(e).__name__}: {e}); the published "
            f"benchmarks need the Hugging Face hub or its cache (HF_DATASETS_OFFLINE=1 with a filled cache). "
            f"Offline, use the proxies: --tasks {','.join(PROXY_TASKS)}"
        ) from e
    finally:
        model.train(was_training)
    out = summarize(res, names)
    out.update(num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, seed=seed,
               lm_eval_version=lm_eval_version(), proxy_data_version=data_version() if proxies else None,
               note="*_proxy tasks are offline proxies built from the embedded test splits, "
                    "not the published benchmarks")
    return out
