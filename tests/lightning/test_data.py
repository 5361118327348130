"""Task-tagged data: collation, seeded draws, unpadded sharding, size checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from magic_pl.lightning.data import (
    HFDataset,
    RandomTaskDataset,
    TaskDataModule,
    TensorFileDataset,
    UnpaddedDistributedSampler,
    as_sample,
    check_calibration_size,
    draw_indices,
    task_collate,
)


def test_as_sample_normalises_tuples_tensors_and_label_key():
    x = torch.ones(2)
    assert as_sample((x, 3))["labels"] == 3
    assert set(as_sample(x)) == {"inputs"}
    assert as_sample({"pixel_values": x, "label": 1}) == {"pixel_values": x, "labels": 1}


def test_task_collate_pads_sequences_and_tags_tasks():
    samples = [
        {"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long),
         "labels": torch.tensor([5, 6, 7]), "task": 1},
        {"input_ids": torch.tensor([8]), "attention_mask": torch.ones(1, dtype=torch.long),
         "labels": torch.tensor([8]), "task": 0},
    ]
    batch = task_collate(samples)
    assert batch["task"].tolist() == [1, 0] and batch["task"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]


def test_draw_indices_seeded_distinct_and_bounded():
    a = draw_indices(50, 5, seed=3, task=1)
    assert a == draw_indices(50, 5, seed=3, task=1)
    assert a != draw_indices(50, 5, seed=3, task=2)
    assert len(set(a)) == 5 and all(0 <= i < 50 for i in a)
    with pytest.raises(ValueError, match="cannot draw 6 calibration samples \(samples_per_task\) from task 0: its dataset has 5"):
        draw_indices(5, 6)


@pytest.mark.parametrize("n,world", [(21, 2), (7, 3), (2, 4), (0, 2)])
def test_unpadded_sampler_visits_every_index_exactly_once(n, world):
    ds = list(range(n))
    seen = [i for r in range(world) for i in UnpaddedDistributedSampler(ds, num_replicas=world, rank=r)]
    assert sorted(seen) == list(range(n))
    assert sum(len(UnpaddedDistributedSampler(ds, num_replicas=world, rank=r)) for r in range(world)) == n


def _dm(**kw) -> TaskDataModule:
    test = {"a": RandomTaskDataset(9, (4,), 3, seed=1), "b": RandomTaskDataset(6, (4,), 2, seed=2)}
    return TaskDataModule(["a", "b"], test=test, **kw)


def test_datamodule_calibration_draws_are_unlabelled_and_task_ordered():
    dm = _dm(samples_per_task=2, seed=0)
    ds = dm.calibration_dataset()
    items = [ds[i] for i in range(len(ds))]
    assert [it["task"] for it in items] == [0, 0, 1, 1]
    assert all("labels" not in it for it in items)
    # the same draw as draw_indices
    idx = draw_indices(9, 2, seed=0, task=0)
    assert torch.equal(items[0]["inputs"], dm.test_sets["a"][idx[0]]["inputs"])


def test_samples_per_task_none_calibrates_on_the_given_samples_in_order():
    dm = _dm(samples_per_task=None)
    ds = dm.calibration_dataset()
    a, b = dm.test_sets["a"], dm.test_sets["b"]
    assert len(ds) == len(a) + len(b)
    assert [ds[i]["task"] for i in range(len(ds))] == [0] * len(a) + [1] * len(b)
    assert all(torch.equal(ds[i]["inputs"], a[i]["inputs"]) for i in range(len(a)))
    with pytest.raises(ValueError, match="samples_per_task must be >= 1 .or None"):
        _dm(samples_per_task=0)


def test_datamodule_test_loader_shards_without_padding():
    dm = _dm(batch_size=4)
    counts = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        batches = list(dm.test_dataloader())
        counts.append(sum(len(b["task"]) for b in batches))
    assert counts == [8, 7]  # 15 samples: no duplicate


def test_too_few_calibration_samples_for_processes_is_a_clear_error():
    dm = _dm(samples_per_task=1)
    dm.trainer = SimpleNamespace(world_size=3, global_rank=0)
    with pytest.raises(ValueError, match=r"has 2 sample\(s\) but the run uses 3 processes"):
        dm.setup("predict")
    with pytest.raises(ValueError, match="at least one sample per process"):
        check_calibration_size(1, 2)
    check_calibration_size(2, 2)


def test_unknown_task_names_are_rejected():
    with pytest.raises(ValueError, match=r"test datasets for unknown tasks \['c'\]"):
        TaskDataModule(["a"], test={"c": RandomTaskDataset(2)})


def test_tensor_file_and_jsonl_datasets(tmp_path):
    from safetensors.torch import save_file

    from lightning_helpers import tiny_tokenizer, write_jsonl

    save_file({"inputs": torch.randn(5, 3), "label": torch.arange(5)}, str(tmp_path / "d.safetensors"))
    ds = TensorFileDataset(tmp_path / "d.safetensors")
    assert len(ds) == 5 and int(ds[3]["labels"]) == 3
    tok = tiny_tokenizer(tmp_path / "tok")
    write_jsonl(tmp_path / "t.jsonl", [{"q": "w1 w2", "a": "w3", "label": 1}, {"q": "w4", "a": "w5 w6", "label": 0}])
    hf = HFDataset(str(tmp_path / "t.jsonl"), tokenizer=str(tok), text_template="{q} {a}")
    assert len(hf) == 2 and int(hf[0]["labels"]) == 1
    assert hf[1]["input_ids"].tolist() == [WORD("w4"), WORD("w5"), WORD("w6")]
    lm = HFDataset(str(tmp_path / "t.jsonl"), tokenizer=str(tok), text_column="q", lm_labels=True)
    assert torch.equal(lm[0]["labels"], lm[0]["input_ids"])


def WORD(w: str) -> int:
    from lightning_helpers import WORDS

    return WORDS.index(w)
