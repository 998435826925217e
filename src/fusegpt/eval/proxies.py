"""Offline zero-shot *proxies* built from the embedded corpora's test splits.

They let accuracy be measured on a machine without the hub; they do **not** replace the published
benchmarks (piqa, hellaswag, ...) and are named ``*_proxy`` everywhere.

- ``wiki_lastword_proxy`` (LAMBADA-style): a passage of consecutive sentences from a ``wiki``
  test article ends in a word that also occurs earlier in the passage (LAMBADA's targets mostly
  do); the model must predict that last word. ``acc`` = the greedy continuation is exactly the
  word (lm-eval's ``is_greedy``, as in ``lambada_openai``); ``perplexity`` of the word.
  Chance is ~0 (open vocabulary).
- ``news_continuation_proxy`` (HellaSwag-style): the title and up to two sentences of a
  ``news`` test article; choose the true next sentence among four, the three distractors being
  sentences of similar length from *other* test articles of the same BBC category. ``acc`` and
  ``acc_norm`` (length-normalised) as lm-eval computes them for hellaswag. Chance is 25%.

Both are deterministic: fixed sentence splitting, selection by a stable hash and a seeded RNG.
The data (JSONL) and the lm-eval task definitions (YAML, ``dataset_path: json``) are written to
``$FUSEGPT_CACHE/proxies/<version>-<source hash>/`` and run through the same harness as any local
task. Sizes: 260 last-word items (every qualifying passage of the wiki test split), 500
continuation items (at most two per news test article).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Callable
from pathlib import Path

from ..data.embedded import is_test_article, news_articles, wiki_articles

logger = logging.getLogger(__name__)

VERSION = "v1"
MAX_DOCS = 500  # per proxy task; lm-eval's --limit cuts further
_SENT = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")
_WORD = re.compile(r"^[A-Za-z]{3,}$")


def split_sentences(paragraph: str) -> list[str]:
    """A plain regex sentence splitter (deterministic; good enough for encyclopaedic/news prose)."""
    return [s.strip() for s in _SENT.split(paragraph.strip()) if s.strip()]


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip() and not p.lstrip().startswith("=")]


def _stable_key(*parts: str) -> str:
    return hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()


def _pick(items: list[dict], n: int) -> list[dict]:
    """At most ``n`` items, chosen by a stable hash, returned in hash order."""
    return sorted(items, key=lambda d: d["id"])[:n]


def build_lastword(max_docs: int = MAX_DOCS, min_words: int = 40, max_words: int = 150) -> list[dict]:
    """LAMBADA-style items ``{id, context, target}`` from the ``wiki`` test split.

    Every sentence end in a paragraph is a candidate: the passage runs back over whole sentences
    of that paragraph until it holds ``min_words`` words. The last word must be alphabetic (3+
    letters) and occur earlier in the passage.
    """
    items = []
    for title, text in wiki_articles():
        if not is_test_article(title):
            continue
        for p_idx, para in enumerate(_paragraphs(text)):
            sents = split_sentences(para)
            for end in range(len(sents)):
                start, words = end + 1, 0
                while start > 0 and words < min_words:
                    start -= 1
                    words += len(sents[start].split())
                if not min_words <= words <= max_words:
                    continue
                stripped = " ".join(sents[start:end + 1]).rstrip().rstrip(".!?\"')]").rstrip()
                if " " not in stripped:
                    continue
                context, target = stripped.rsplit(" ", 1)
                if not _WORD.match(target) or not re.search(rf"\b{re.escape(target)}\b", context, re.I):
                    continue
                items.append({"id": _stable_key("wiki", title, str(p_idx), str(end)), "context": context,
                              "target": target, "article": title})
    return _pick(items, max_docs)


def build_continuation(max_docs: int = MAX_DOCS, n_choices: int = 4, seed: int = 0) -> list[dict]:
    """HellaSwag-style items ``{id, context, choices, label}`` from the ``news`` test split.

    The true ending is the sentence that follows the context; the distractors are sentences of
    similar length (within 25%, at least 3 words) drawn by a seeded RNG from other test articles.
    At most two items per article.
    """
    arts = [(k, text) for k, text in news_articles() if is_test_article(k)]
    pool: list[tuple[int, str]] = []  # (article number, sentence)
    cands = []
    for a_idx, (_key, text) in enumerate(arts):
        title, *body = text.split("\n\n")
        sents = [s for para in body for s in split_sentences(para)]
        pool.extend((a_idx, s) for s in sents if 6 <= len(s.split()) <= 40)
        for i in range(1, len(sents)):
            if not 6 <= len(sents[i].split()) <= 40:
                continue
            prev = sents[max(0, i - 2):i]
            while len(prev) > 1 and sum(len(s.split()) for s in prev) > 60:
                prev = prev[1:]
            cands.append({"id": _stable_key("news", title.strip(), str(i)), "art": a_idx, "title": title.strip(),
                          "prev": prev, "ending": sents[i]})
    per_article: dict[int, list[dict]] = {}
    for c in sorted(cands, key=lambda c: c["id"]):
        if len(per_article.setdefault(c["art"], [])) < 2:
            per_article[c["art"]].append(c)
    chosen = _pick([c for cs in per_article.values() for c in cs], max_docs)
    by_len: dict[int, list[tuple[int, str]]] = {}
    for a, s in pool:
        by_len.setdefault(len(s.split()), []).append((a, s))
    rng = random.Random(seed)
    items = []
    for c in chosen:
        n_true = len(c["ending"].split())
        tol = max(3, n_true // 4)
        others = sorted({s for n in range(n_true - tol, n_true + tol + 1) for a, s in by_len.get(n, ())
                         if a != c["art"] and s != c["ending"]})
        distractors = rng.sample(others, n_choices - 1)
        label = rng.randrange(n_choices)
        choices = distractors[:label] + [c["ending"]] + distractors[label:]
        items.append({"id": c["id"], "context": c["title"] + "\n" + " ".join(c["prev"]), "choices": choices,
                      "label": label})
    return items


_TASK_YAML = {
    "wiki_lastword_proxy": {
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{' ' + target}}",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    },
    "news_continuation_proxy": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{label}}",
        "doc_to_choice": "choices",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    },
}
_BUILDERS: dict[str, Callable[[], list[dict]]] = {
    "wiki_lastword_proxy": build_lastword,
    "news_continuation_proxy": build_continuation,
}
PROXY_TASKS = tuple(_TASK_YAML)
CHANCE = {"wiki_lastword_proxy": 0.0, "news_continuation_proxy": 0.25}


def task_yaml(name: str, data_file: Path) -> str:
    """The lm-eval task definition of a proxy: a local JSON data set, test split only."""
    cfg = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
           "test_split": "test", **_TASK_YAML[name], "metadata": {"version": data_version(), "proxy": True}}
    return json.dumps(cfg, indent=2) + "\n"  # JSON is valid YAML


def data_version() -> str:
    """``VERSION`` plus a fingerprint of this module's source: the cache is rebuilt when the code changes."""
    src = Path(__file__).read_bytes()
    return f"{VERSION}-{hashlib.sha1(src).hexdigest()[:8]}"


def proxy_dir() -> Path:
    from ..loading import cache_dir

    return cache_dir() / "proxies" / data_version()


def write_proxy_tasks(root: Path | None = None, names: tuple[str, ...] = PROXY_TASKS) -> Path:
    """Build the proxies' JSONL data and YAML task files (once; cached) and return their folder."""
    root = Path(root) if root is not None else proxy_dir()
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        data, yaml = root / f"{name}.jsonl", root / f"{name}.yaml"
        if not data.is_file():
            items = _BUILDERS[name]()
            tmp = data.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(d) + "\n" for d in items), encoding="utf-8")
            tmp.replace(data)
            logger.info("built %s: %d items -> %s", name, len(items), data)
        text = task_yaml(name, data)
        if not yaml.is_file() or yaml.read_text() != text:
            yaml.write_text(text)
    return root
