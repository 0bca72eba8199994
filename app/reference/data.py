"""Mixed-domain text that every Python install carries, tokenized into words.

Domains: ``code`` (standard-library source with docstrings removed), ``docstrings`` (the
docstrings pulled out of that source) and ``docs`` (pydoc topic texts, reference prose). A sample
is seq_len + 1 consecutive tokens of one domain, so samples of a batch differ by domain the way
real pretraining mixtures do, which is what gives experts and samples locality.

The tokenizer splits words, single punctuation marks, newlines and runs of spaces; the vocab_size
most frequent of those are tokens, any other word is spelled with single-character tokens.
Everything is deterministic: the same inputs give the same vocabulary and ids on every rank.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DOMAINS = ("code", "docstrings", "docs")
_SPLIT = re.compile(r"[A-Za-z_]+|\d|[^\w\s]|\n|[ \t]+|\w")
# Sorted list slice of stdlib files: bounded corpus (about 1.5 MB) so building it takes seconds.
_MAX_FILES = 160
_UNK = "<unk>"


@dataclass(frozen=True)
class Corpus:
    """Token streams per domain.

    vocab: id -> token string; streams: domain -> [n_tokens] int32 ids.
    """

    vocab: tuple[str, ...]
    streams: dict[str, np.ndarray]

    def batch(self, step: int, samples: int, seq_len: int, seed: int) -> np.ndarray:
        """Global batch of one step: [samples, seq_len + 1] int64, rows shuffled across domains.

        Deterministic in (seed, step); inputs are [:, :-1], labels [:, 1:].
        """
        rng = np.random.default_rng([seed, step])
        domain = rng.integers(0, len(DOMAINS), size=samples)
        out = np.empty((samples, seq_len + 1), dtype=np.int64)
        for i, d in enumerate(domain):
            stream = self.streams[DOMAINS[d]]
            start = int(rng.integers(0, stream.size - seq_len - 1))
            out[i] = stream[start : start + seq_len + 1]
        return out

    def domains(self, step: int, samples: int, seed: int) -> np.ndarray:
        """[samples] int: domain index of each row of ``batch(step, ...)``."""
        return np.random.default_rng([seed, step]).integers(0, len(DOMAINS), size=samples)


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if "test" not in p.relative_to(root).parts[0] and "site-packages" not in p.parts
    )
    # An even stride over the sorted list mixes packages instead of taking only a*.py files.
    step = max(1, len(files) // _MAX_FILES)
    return files[::step][:_MAX_FILES]


def _split_source(text: str) -> tuple[str, list[str]]:
    """Source text without its docstrings, and the docstrings."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return text, []
    docs: list[str] = []
    spans: list[tuple[int, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                value = body[0].value.value
                if isinstance(value, str):
                    docs.append(value.strip())
                    spans.append((body[0].lineno, body[0].end_lineno or body[0].lineno))
    lines = text.splitlines()
    drop = {ln for a, b in spans for ln in range(a, b + 1)}
    code = "\n".join(line for i, line in enumerate(lines, 1) if i not in drop)
    return code, docs


def raw_texts() -> dict[str, str]:
    """The demo corpus's three domains as text: "code" (the standard library's sources without
    docstrings), "docstrings" (theirs), "docs" (pydoc's topics)."""
    from pydoc_data.topics import topics

    code, docs = [], []
    for path in _stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        c, d = _split_source(text)
        code.append(c)
        docs.extend(d)
    prose = [topics[k] for k in sorted(topics)]
    return {"code": "\n".join(code), "docstrings": "\n\n".join(docs), "docs": "\n\n".join(prose)}


def build_corpus(vocab_size: int = 2048) -> Corpus:
    """Read the standard library and tokenize it (a few seconds)."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300, got {vocab_size}")
    texts = raw_texts()
    pieces = {d: _SPLIT.findall(texts[d]) for d in DOMAINS}
    chars = Counter(ch for d in DOMAINS for ch in texts[d])
    char_tokens = [c for c, _ in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))][:200]
    words = Counter(p for d in DOMAINS for p in pieces[d] if len(p) > 1)
    free = vocab_size - 1 - len(char_tokens)
    word_tokens = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))][:free]
    vocab = (_UNK, *char_tokens, *word_tokens)
    index = {t: i for i, t in enumerate(vocab)}
    streams = {}
    for d in DOMAINS:
        ids: list[int] = []
        for p in pieces[d]:
            tid = index.get(p)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(index.get(ch, 0) for ch in p)
        streams[d] = np.asarray(ids, dtype=np.int32)
    return Corpus(vocab, streams)


def default_cache_dir() -> Path:
    """Where built corpora and checkpoints are cached (outside the repository)."""
    base = os.environ.get("NETMOE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "netmoe"
    )
    return Path(base)


def load_corpus(vocab_size: int = 2048, cache_dir: Path | str | None = None) -> Corpus:
    """build_corpus, cached as an .npz keyed by vocab size and Python version."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tag = sysconfig.get_python_version()
    path = cache / f"corpus-py{tag}-v{vocab_size}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return Corpus(tuple(str(t) for t in z["vocab"]), {d: z[d] for d in DOMAINS})
    corpus = build_corpus(vocab_size)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, vocab=np.asarray(corpus.vocab), **corpus.streams)
        os.replace(tmp, path)
    except OSError as err:  # e.g. HOME=/ under a uid without passwd entry: train uncached
        log.warning("corpus cache %s is not writable (%s); set --cache-dir or NETMOE_CACHE",
                    cache, err)
    return corpus
