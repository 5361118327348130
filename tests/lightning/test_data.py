"""Task-tagged data: collation, seeded draws, unpadded sharding, option / size / label checks."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn
from safetensors.torch import save_file
from torch import nn

from magic_pl.lightning.data import (
    HFDataset,
    RandomTaskDataset,
    TaskDataModule,
    TensorFileDataset,
    UnpaddedDistributedSampler,
    as_sample,
    check_calibration_size,
    check_label_range,
    dataset_labels,
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
    with pytest.raises(ValueError,
                       match=r"cannot draw 6 calibration samples \(samples_per_task\) from task 0: its dataset has 5"):
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
    from lightning_helpers import tiny_tokenizer, write_jsonl
    from safetensors.torch import save_file

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


# --------------------------------------------------------------------------------------------------------------------
# Options: every count is checked when the object is built, naming the option and the value
# --------------------------------------------------------------------------------------------------------------------
def _random(**kw):
    return RandomTaskDataset(**kw)


def _hf(tmp_path, **kw):
    from lightning_helpers import write_jsonl

    return HFDataset(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "w1", "label": 0}])), tokenizer="unused", **kw)


def _datamodule(**kw):
    return TaskDataModule(["a"], test={"a": RandomTaskDataset(4)}, **kw)


# (id, builder, keyword arguments, expected message)
OPTION_CASES = [
    ("batch_size 0", _datamodule, {"batch_size": 0}, r"^batch_size must be >= 1, got 0$"),
    ("batch_size negative", _datamodule, {"batch_size": -3}, r"^batch_size must be >= 1, got -3$"),
    ("batch_size bool", _datamodule, {"batch_size": True}, r"^batch_size must be an integer >= 1, got True$"),
    ("batch_size float", _datamodule, {"batch_size": 2.5}, r"^batch_size must be an integer >= 1, got 2\.5$"),
    ("calibration_batch_size 0", _datamodule, {"calibration_batch_size": 0},
     r"^calibration_batch_size must be >= 1, got 0$"),
    ("test_limit -1", _datamodule, {"test_limit": -1}, r"^test_limit must be >= 1 \(or None: every sample\), got -1$"),
    ("test_limit 0", _datamodule, {"test_limit": 0}, r"^test_limit must be >= 1 \(or None: every sample\), got 0$"),
    ("num_workers -1", _datamodule, {"num_workers": -1}, r"^num_workers must be >= 0, got -1$"),
    ("samples_per_task 0", _datamodule, {"samples_per_task": 0},
     r"^samples_per_task must be >= 1 \(or None: every sample\), got 0$"),
    ("seed not an int", _datamodule, {"seed": "x"}, r"^seed must be an integer, got 'x'$"),
    ("random num_samples 0", _random, {"num_samples": 0}, r"^num_samples must be >= 1, got 0$"),
    ("random num_classes 0", _random, {"num_classes": 0}, r"^num_classes must be >= 1, got 0$"),
    ("random shape 0", _random, {"shape": (3, 0)}, r"^shape must be >= 1, got 0$"),
    ("hf limit -1", _hf, {"limit": -1}, r"^limit must be >= 1 \(or None: every row\), got -1$"),
    ("hf max_length 0", _hf, {"max_length": 0}, r"^max_length must be >= 1, got 0$"),
]


@pytest.mark.parametrize("build, kwargs, message", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_bad_count_options_are_refused_when_built(build, kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        build(tmp_path, **kwargs) if build is _hf else build(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Labels of a file: read and checked when the dataset is built
# --------------------------------------------------------------------------------------------------------------------
# (id, file name, content, HFDataset keyword arguments, expected message: file, column, row)
FILE_LABEL_CASES = [
    ("string label in jsonl", "t.jsonl", '{"text": "w1", "label": 1}\n{"text": "w2", "label": "positive"}\n', {},
     r"t\.jsonl: column 'label', row 2: label 'positive' is not an integer class id; give label_names"),
    ("digit string in jsonl", "t.jsonl", '{"text": "w1", "label": "1"}\n', {},
     r"t\.jsonl: column 'label', row 1: label '1' is not an integer class id"),
    ("name in csv", "t.csv", "text,label\nw1,0\nw2,pos\n", {},
     r"t\.csv: column 'label', row 2: label 'pos' is not an integer class id"),
    ("fraction in json", "t.json", '[{"text": "w1", "label": 1.5}]', {},
     r"t\.json: column 'label', row 1: label 1\.5 is not an integer class id"),
    ("boolean in jsonl", "t.jsonl", '{"text": "w1", "label": true}\n', {},
     r"t\.jsonl: column 'label', row 1: label True is not an integer class id"),
    ("missing in some rows", "t.jsonl", '{"text": "w1", "label": 0}\n{"text": "w2"}\n', {},
     r"t\.jsonl: row 2 has no 'label' column while other rows do"),
    ("other label column", "t.jsonl", '{"text": "w1", "y": "neg"}\n', {"label_column": "y"},
     r"t\.jsonl: column 'y', row 1: label 'neg' is not an integer class id"),
    ("name not in label_names", "t.jsonl", '{"text": "w1", "label": "neutral"}\n', {"label_names": ["neg", "pos"]},
     r"t\.jsonl: column 'label', row 1: label 'neutral' is not in label_names \['neg', 'pos'\]"),
    ("bad json line", "t.jsonl", '{"text": "w1", "label": 0}\n{"text": \n', {},
     r"t\.jsonl: line 2 is not JSON"),
    ("row not an object", "t.jsonl", '[1, 2]\n', {}, r"t\.jsonl: row 1 is a list, not an object of columns"),
]


@pytest.mark.parametrize("name, content, kwargs, message", [c[1:] for c in FILE_LABEL_CASES],
                         ids=[c[0] for c in FILE_LABEL_CASES])
def test_bad_file_labels_are_refused_when_the_dataset_is_built(name, content, kwargs, message, tmp_path):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        HFDataset(str(tmp_path / name), tokenizer="never-loaded", **kwargs)


def test_file_labels_that_are_class_ids_are_read_without_processing_the_inputs(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\nw1,2\nw2,0\n")
    (tmp_path / "t.json").write_text('[{"text": "w1", "label": 2.0}, {"text": "w2", "label": 1}]')
    (tmp_path / "n.jsonl").write_text('{"text": "w1", "label": "pos"}\n{"text": "w2", "label": "neg"}\n')
    (tmp_path / "u.jsonl").write_text('{"text": "w1"}\n')
    # no tokenizer is loaded to read labels ("never-loaded" is no tokenizer at all)
    assert HFDataset(str(tmp_path / "t.csv"), tokenizer="never-loaded").labels().tolist() == [2, 0]
    assert HFDataset(str(tmp_path / "t.json"), tokenizer="never-loaded").labels().tolist() == [2, 1]
    assert HFDataset(str(tmp_path / "n.jsonl"), tokenizer="never-loaded",
                     label_names=["neg", "pos"]).labels().tolist() == [1, 0]
    assert HFDataset(str(tmp_path / "n.jsonl"), tokenizer="never-loaded",
                     label_names={"pos": 4, "neg": 7}).labels().tolist() == [4, 7]
    assert HFDataset(str(tmp_path / "t.csv"), tokenizer="never-loaded", limit=1).labels().tolist() == [2]
    unlabelled = HFDataset(str(tmp_path / "u.jsonl"), tokenizer="never-loaded")  # calibration data: fine
    with pytest.raises(ValueError, match=r"u\.jsonl has no label column 'label': evaluation needs labels"):
        unlabelled.labels()


def test_tensor_file_labels_must_be_class_ids(tmp_path):
    save_file({"inputs": torch.randn(3, 2), "label": torch.tensor([0.0, 1.0, 2.5])}, str(tmp_path / "f.safetensors"))
    with pytest.raises(ValueError, match=r"f\.safetensors: tensor 'label' must hold integer class ids, got "
                                         r"torch\.float32"):
        TensorFileDataset(tmp_path / "f.safetensors")
    save_file({"inputs": torch.randn(3, 2)}, str(tmp_path / "u.safetensors"))
    with pytest.raises(ValueError, match=r"u\.safetensors has no 'label' tensor"):
        TensorFileDataset(tmp_path / "u.safetensors").labels()


# --------------------------------------------------------------------------------------------------------------------
# Labels against the heads' class counts
# --------------------------------------------------------------------------------------------------------------------
class Listed(torch.utils.data.Dataset):
    """A dataset with no labels() accessor: labels are read item by item."""

    def __init__(self, labels):
        self.items = [{"inputs": torch.full((6,), float(i)), "labels": y} for i, y in enumerate(labels)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _label_file(tmp_path, labels, suffix="jsonl"):
    path = tmp_path / f"x.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(f'{{"text": "w{i}", "label": {y}}}\n' for i, y in enumerate(labels)))
        return HFDataset(str(path), tokenizer="never-loaded")
    save_file({"inputs": torch.randn(len(labels), 6), "label": torch.tensor(labels)}, str(path))
    return TensorFileDataset(path)


# (id, dataset builder, split, expected message: task, set, label, class count)
RANGE_CASES = [
    ("jsonl test set", lambda tmp: _label_file(tmp, [0, 2, 5, 1]), "test",
     r"^the test set of task 'x' \(.*x\.jsonl, column 'label'\): label 5 at index 2 is outside the 3 classes of the "
     r"task's head \(0\.\.2\); 1 of 4 labels are out of range$"),
    ("tensor file test set", lambda tmp: _label_file(tmp, [0, -1, 1], "safetensors"), "test",
     r"^the test set of task 'x' \(.*x\.safetensors, tensor 'label'\): label -1 at index 1 is outside the 3 classes"),
    ("random validation set", lambda tmp: RandomTaskDataset(30, (6,), 7, seed=1), "val",
     r"^the validation set of task 'x' \(RandomTaskDataset with num_classes=7\): label [3-6] at index \d+ is outside "
     r"the 3 classes"),
    ("plain dataset, read item by item", lambda tmp: Listed([0, 1, 3]), "test",
     r"^the test set of task 'x' \(Listed\): label 3 at index 2 is outside the 3 classes"),
    ("non-integer label of a plain dataset", lambda tmp: Listed([0, 1.0]), "test",
     r"^the test set of task 'x' \(Listed\), item 1: label 1\.0 is not an integer class id$"),
]


@pytest.mark.parametrize("build, split, message", [c[1:] for c in RANGE_CASES], ids=[c[0] for c in RANGE_CASES])
def test_labels_outside_the_heads_classes_are_refused(build, split, message, tmp_path):
    dm = TaskDataModule(["x", "y"], **{split: {"x": build(tmp_path), "y": Listed([0, 1])}})
    with pytest.raises(ValueError, match=message):
        dm.check_labels({"x": 3, "y": 2})
    dm.check_labels({"x": None, "y": 2})  # class count unknown: nothing to check against


def test_label_check_reads_only_the_kept_samples_and_each_set_once(tmp_path):
    dm = TaskDataModule(["x"], test={"x": Listed([0, 2, 7])}, test_limit=2)
    dm.check_labels({"x": 3})  # the out-of-range label is past test_limit: never evaluated
    dm.test_sets["x"].items[0]["labels"] = 9
    dm.check_labels({"x": 3})  # checked once per class count
    with pytest.raises(ValueError, match="label 9 at index 0"):
        dm.check_labels({"x": 4})
    assert dataset_labels(Listed([torch.tensor([1, 2])])) is None  # token labels (causal LM): no class range
    check_label_range(torch.tensor([0, -100, 2]), 3, "x")  # the ignore index is skipped, as evaluation skips it


class _Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def _merge_module(heads):
    from magic_pl.lightning import MagicModule

    torch.manual_seed(0)
    base = _Body()
    experts = []
    for i in range(2):
        e = copy.deepcopy(base)
        with torch.no_grad():
            e.fc.weight.add_(0.1 * torch.randn(e.fc.weight.shape, generator=torch.Generator().manual_seed(i)))
        experts.append(e)
    return MagicModule(model=base, experts=experts, task_names=["x", "y"], heads=heads, calibration="none")


def _trainer():
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False)


def test_a_test_label_outside_the_head_fails_before_any_accuracy(tmp_path):
    heads = {"x": nn.Linear(8, 3), "y": nn.Linear(8, 2)}
    bad = TaskDataModule(["x", "y"], test={"x": _label_file(tmp_path, [0, 5, 1], "safetensors"),
                                           "y": Listed([0, 1])})
    module = _merge_module(heads)
    with pytest.raises(ValueError, match=r"the test set of task 'x' \(.*x\.safetensors, tensor 'label'\): label 5 at "
                                         r"index 1 is outside the 3 classes of the task's head"):
        _trainer().test(module, datamodule=bad, verbose=False)
    assert module.calibration_record.metrics == {}  # nothing was scored

    # valid labels still evaluate, to the exact accuracy
    good = {"x": RandomTaskDataset(9, (6,), 3, seed=1), "y": RandomTaskDataset(5, (6,), 2, seed=2)}
    module = _merge_module(heads)
    _trainer().test(module, datamodule=TaskDataModule(["x", "y"], test=good, batch_size=4), verbose=False)
    for task, ds in good.items():
        with torch.no_grad():
            want = (module(ds.x, task=task).argmax(-1) == ds.y).double().mean().item()
        assert module.calibration_record.metrics[f"test/acc/{task}"] == pytest.approx(want, abs=1e-12)


def test_without_a_datamodule_labels_are_checked_against_the_logits(tmp_path):
    from magic_pl.lightning.data import task_collate

    module = _merge_module({"x": nn.Sequential(nn.ReLU()), "y": nn.Linear(8, 2)})  # x's head: 8 outputs, unknown
    module.build()
    assert module.class_counts() == {"x": None, "y": 2}
    items = [{"inputs": torch.randn(6), "labels": 8, "task": 0}, {"inputs": torch.randn(6), "labels": 1, "task": 1}]
    loader = torch.utils.data.DataLoader(items, batch_size=2, collate_fn=task_collate)
    with pytest.raises(ValueError, match=r"^a test batch of task 'x': label 8 at index 0 is outside the 8 classes"):
        _trainer().test(module, dataloaders=loader, verbose=False)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation data smaller than the process count: refused at setup, before calibration
# --------------------------------------------------------------------------------------------------------------------
# (id, datamodule keyword arguments, stage, expected message: the set, the sizes per task, the process count)
SIZE_CASES = [
    ("test set at predict", {"test": {"a": RandomTaskDataset(1), "b": RandomTaskDataset(1)}}, "predict",
     r"^the test data \(task 'a': 1, task 'b': 1\) has 2 sample\(s\) but the run uses 3 processes: evaluation needs "
     r"at least one sample per process .*Use at most 2 device\(s\) or more test samples\.$"),
    ("test set at test, a Lightning stage enum", {"test": {"a": RandomTaskDataset(2)}}, TrainerFn.TESTING,
     r"^the test data \(task 'a': 2\) has 2 sample\(s\) but the run uses 3 processes"),
    ("after test_limit", {"test": {"a": RandomTaskDataset(9), "b": RandomTaskDataset(9)}, "test_limit": 1},
     "predict", r"^the test data \(task 'a': 1, task 'b': 1 after test_limit=1\) has 2 sample\(s\) .* or more test "
                r"samples \(a larger test_limit\)\.$"),
    ("validation set at predict", {"test": {"a": RandomTaskDataset(8)}, "val": {"a": RandomTaskDataset(2)}},
     "predict", r"^the validation data \(task 'a': 2\) has 2 sample\(s\) but the run uses 3 processes"),
    ("validation set at validate", {"val": {"a": RandomTaskDataset(1)}}, TrainerFn.VALIDATING,
     r"^the validation data \(task 'a': 1\) has 1 sample\(s\) but the run uses 3 processes"),
]


@pytest.mark.parametrize("kwargs, stage, message", [c[1:] for c in SIZE_CASES], ids=[c[0] for c in SIZE_CASES])
def test_evaluation_data_smaller_than_the_process_count_is_refused_at_setup(kwargs, stage, message):
    kwargs = {"calibration": {"a": RandomTaskDataset(8), "b": RandomTaskDataset(8)}, "samples_per_task": 2, **kwargs}
    dm = TaskDataModule(["a", "b"], **kwargs)
    dm.trainer = SimpleNamespace(world_size=3, global_rank=0)
    with pytest.raises(ValueError, match=message):
        dm.setup(stage)
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0)
    dm.setup(stage)  # one process: enough


# ---------------------------------------------------------------------------------------------------------------------
# Data from the files users have: text lines, image folders (flat or one folder per class)
# ---------------------------------------------------------------------------------------------------------------------
def _tokenizer_dir(tmp_path):
    from transformers import BertTokenizer

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad",
                                                   "film"]) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "tok")
    return str(tmp_path / "tok")


def _image_processor_dir(tmp_path):
    from transformers import ViTImageProcessor

    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(tmp_path / "proc")
    return str(tmp_path / "proc")


def _png(path, value: int) -> None:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((5, 6, 3), value, dtype=np.uint8)).save(path)


def test_a_txt_file_gives_one_unlabelled_text_per_line(tmp_path):
    (tmp_path / "calib.txt").write_text("good film\n\n  bad film\n")
    ds = HFDataset(str(tmp_path / "calib.txt"), tokenizer=_tokenizer_dir(tmp_path))
    assert len(ds) == 2 and ds._labels is None  # unlabelled: calibration data
    assert ds[0]["input_ids"].tolist() == [2, 5, 7, 3] and "labels" not in ds[0]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match=r"empty\.txt has no text"):
        HFDataset(str(tmp_path / "empty.txt"), tokenizer=_tokenizer_dir(tmp_path))


def test_image_folders_flat_unlabelled_and_one_folder_per_class(tmp_path):
    proc = _image_processor_dir(tmp_path)
    _png(tmp_path / "flat" / "x.png", 10)
    _png(tmp_path / "flat" / "y.jpg", 200)
    (tmp_path / "flat" / "notes.md").write_text("not an image")
    flat = HFDataset(str(tmp_path / "flat"), image_processor=proc)
    assert len(flat) == 2 and flat._labels is None and flat[0]["pixel_values"].shape == (3, 8, 8)
    for cls, value in (("cat", 0), ("dog", 255), ("ant", 128)):
        _png(tmp_path / "classes" / cls / "1.png", value)
    _png(tmp_path / "classes" / "dog" / "2.png", 250)
    ds = HFDataset(str(tmp_path / "classes"), image_processor=proc)
    assert ds.labels().tolist() == [0, 1, 2, 2]  # ant, cat, dog, dog: sorted folder names
    named = HFDataset(str(tmp_path / "classes"), image_processor=proc, label_names={"ant": 2, "cat": 1, "dog": 0})
    assert named.labels().tolist() == [2, 1, 0, 0]
    _png(tmp_path / "mixed" / "a.png", 1)
    _png(tmp_path / "mixed" / "cls" / "b.png", 1)
    (tmp_path / "classes" / "empty").mkdir()
    for folder, why in (("mixed", "both images and sub-folders"), ("classes", "class folder .*empty holds no images")):
        with pytest.raises(ValueError, match=why):
            HFDataset(str(tmp_path / folder), image_processor=proc)
