"""``magic-pl benchmark -c my_models.yaml`` on the user's own experts, end to end from the CLI: tiny BERT classifiers
fine-tuned on word rules (so predictions depend on the input and rows differ), local .jsonl test and .txt calibration
files. The rows are checked against an independent ``magic-pl calibrate`` run, the same seed reproduces the numbers,
and bad configs fail before any tensor is read."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tiny_models import save_bert_classifiers

from magic_pl.lightning.cli import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmark.md"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(20)]
TASKS = {"sentiment": 2, "topic": 3}
METHODS = ["task_arithmetic", "ties"]
CALIBRATIONS = ["none", "wsc", "fsc"]
TRAINER = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
           "enable_model_summary": False, "enable_progress_bar": False}


def _rows(task: str, n: int, seed: int) -> list[dict]:
    """Texts of 3-6 words; sentiment: most words below w10; topic: the first word's number mod 3."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [f"w{rng.randrange(20)}" for _ in range(rng.randrange(3, 7))]
        label = (int(2 * sum(int(w[1:]) < 10 for w in words) > len(words)) if task == "sentiment"
                 else int(words[0][1:]) % 3)
        out.append({"text": " ".join(words), "label": label})
    return out


def _finetune(directory: Path, task: str, tokenizer) -> None:
    """A few AdamW steps on the task's rule (about 0.5 s), saved back in place."""
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(directory)
    train = _rows(task, 64, seed=1)
    enc = tokenizer([r["text"] for r in train], padding=True, return_tensors="pt")
    labels = torch.tensor([r["label"] for r in train])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):
        idx = torch.randint(0, len(train), (16,), generator=gen)
        loss = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx],
                     labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(directory)


def _hf(path: Path, tokenizer: Path) -> dict:
    return {"class_path": "magic_pl.lightning.HFDataset", "init_args": {"path": str(path), "tokenizer": str(tokenizer)}}


def _layout(root: Path) -> dict:
    """Base, two fine-tuned experts, test and calibration files; returns the benchmark config (absolute paths)."""
    from transformers import AutoTokenizer

    models, data = root / "models", root / "data"
    torch.manual_seed(0)
    save_bert_classifiers(models / "base", {models / t: k for t, k in TASKS.items()}, VOCAB)
    tokenizer = AutoTokenizer.from_pretrained(models / "base")
    for task in TASKS:
        _finetune(models / task, task, tokenizer)
    data.mkdir()
    for i, task in enumerate(TASKS):
        (data / f"{task}_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(task, 24, 10 + i)))
        (data / f"{task}_calib.txt").write_text("\n".join(r["text"] for r in _rows(task, 8, 20 + i)) + "\n")
    return {
        "model": {"class_path": "magic_pl.models.SequenceClassificationAdapter",
                  "init_args": {"base": str(models / "base"), "experts": [str(models / t) for t in TASKS],
                                "task_names": list(TASKS)}},
        "data": {"class_path": "magic_pl.lightning.TaskDataModule",
                 "init_args": {"task_names": list(TASKS),
                               "test": {t: _hf(data / f"{t}_test.jsonl", models / "base") for t in TASKS},
                               "calibration": {t: _hf(data / f"{t}_calib.txt", models / "base") for t in TASKS}}},
        "methods": METHODS, "calibrations": CALIBRATIONS, "n_calib": 2, "draws": 2, "bootstrap": 200,
        "progress": False, "results_dir": str(root / "results"),
    }


def _benchmark(path: Path, config: dict, *extra: str) -> dict:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    main(["benchmark", "-c", str(path), *extra])
    return json.loads((Path(config["results_dir"]) / "results.json").read_text())


def _index(result: dict) -> dict:
    return {(r["method"], r["calibration"]): r for r in result["rows"]}


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    config = _layout(root)
    return {"root": root, "config": config, "result": _benchmark(root / "my_models.yaml", config)}


def test_every_row_is_in_every_report(own):
    result, out = own["result"], Path(own["config"]["results_dir"])
    rows = _index(result)
    assert set(rows) == {("base", "none"), ("expert", "none")} | {(m, c) for m in METHODS for c in CALIBRATIONS}
    for (method, calib), r in rows.items():
        assert r["draws"] == (2 if calib == "fsc" else 1), (method, calib)
        assert set(r["per_task"]) == set(TASKS)
        assert r["avg"] == pytest.approx(np.mean(list(r["per_task"].values())))
        lo, hi = r["avg_ci95"]
        assert lo <= r["avg"] <= hi
    assert result["config"]["draw_seeds"] == [0, 1]
    md = (out / "results.md").read_text()
    for m in METHODS:
        assert f"| {m} | " in md
    assert "| method | none | WSC | FSC n=2 |" in md and "experts, each on its own task" in md
    csv_rows = [line.split(",")[:2] for line in (out / "results.csv").read_text().strip().splitlines()[1:]]
    assert sorted(map(tuple, csv_rows)) == sorted(rows)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for d in (0, 1):  # one calibration report per draw, with the draw's data seed
        report = json.loads((out / "calibration" / f"ties__fsc__draw{d}.json").read_text())
        assert report["data_seed"] == d and report["coefficients"]
    assert set(result["gains"]["over_uncalibrated"]) == set(METHODS)
    # the fine-tuned experts beat the base on their own tasks, so the table measures something
    assert rows[("expert", "none")]["avg"] > rows[("base", "none")]["avg"] + 0.1
    assert len({r["avg"] for r in rows.values()}) > 2


def test_rows_equal_an_independent_magic_pl_calibrate_run(own, tmp_path, monkeypatch):
    """``magic-pl calibrate`` of TIES + FSC on draw 1's data seed: its calibrated, uncalibrated and per-expert
    accuracies and its xi are the benchmark's ties/fsc (draw 1), ties/none and expert rows."""
    monkeypatch.chdir(tmp_path)  # without a logger, Lightning saves the run's config.yaml in the working directory
    result, config = own["result"], own["config"]
    rows = _index(result)
    data = json.loads(json.dumps(config["data"]))
    data["init_args"].update(samples_per_task=2, seed=result["config"]["draw_seeds"][1])
    calibrate = {"seed_everything": 0, "trainer": TRAINER,
                 "model": {"class_path": "magic_pl.lightning.MagicModule",
                           "init_args": {"adapter": config["model"], "merge_method": "ties",
                                         "merge_options": result["config"]["merge_options"]["ties"],
                                         "calibration": "fsc"}},
                 "data": data}
    (tmp_path / "calibrate.yaml").write_text(yaml.safe_dump(calibrate, sort_keys=False))
    main(["calibrate", "-c", str(tmp_path / "calibrate.yaml"), "--output_dir", str(tmp_path / "out"),
          "--save_model", "false"])
    report = json.loads((tmp_path / "out" / "calibration_report.json").read_text())
    comparison = report["comparison"]
    assert comparison["calibrated"]["test/acc/avg"] == pytest.approx(rows[("ties", "fsc")]["draw_avgs"][1], abs=1e-6)
    for task in TASKS:
        assert comparison["uncalibrated"][f"test/acc/{task}"] == pytest.approx(
            rows[("ties", "none")]["per_task"][task], abs=1e-6)
        assert comparison["experts_on_own_task"][task] == pytest.approx(rows[("expert", "none")]["per_task"][task],
                                                                        abs=1e-6)
    drawn = json.loads((Path(config["results_dir"]) / "calibration" / "ties__fsc__draw1.json").read_text())
    assert report["coefficients"] == pytest.approx(drawn["coefficients"], rel=1e-6)


def test_the_same_seed_reproduces_the_draws(own, tmp_path):
    result = own["result"]
    first = _index(result)[("ties", "fsc")]
    config = {**own["config"], "methods": ["ties"], "calibrations": ["fsc"], "results_dir": str(tmp_path / "again")}
    again = _benchmark(tmp_path / "again.yaml", config)
    row = _index(again)[("ties", "fsc")]
    assert row["draw_avgs"] == first["draw_avgs"] and row["per_task"] == first["per_task"]
    assert again["config"]["calibration_samples"] == result["config"]["calibration_samples"]
    for d in (0, 1):  # the same samples, so the same xi
        a, b = (json.loads((Path(p) / "calibration" / f"ties__fsc__draw{d}.json").read_text())["coefficients"]
                for p in (own["config"]["results_dir"], tmp_path / "again"))
        assert a == b
    picked = result["config"]["calibration_samples"]
    assert picked[0] != picked[1]  # two draws, two different sets of samples
    for draw in picked:
        assert all(len(idx) == 2 == len(set(idx)) and all(0 <= i < 8 for i in idx) for idx in draw.values())
    other = _benchmark(tmp_path / "other.yaml", {**config, "results_dir": str(tmp_path / "other")}, "--seed", "1")
    assert other["config"]["draw_seeds"] == [1000, 1001]
    assert other["config"]["calibration_samples"] != result["config"]["calibration_samples"]


def test_label_free_selection_row(own, tmp_path):
    config = {**own["config"], "calibrations": ["none", "fsc"], "select": True, "results_dir": str(tmp_path / "sel")}
    rows = _index(_benchmark(tmp_path / "sel.yaml", config))
    chosen = rows[("selected", "label-free")]
    candidates = {k: r for k, r in rows.items() if "selection_scores" in r}
    for d in (0, 1):  # on each draw, the row closest to the experts on that draw's samples
        best = min(candidates, key=lambda k: candidates[k]["selection_scores"][d])
        assert chosen["choices"][d] == f"{best[0]}@{best[1]}"
        assert chosen["draw_avgs"][d] == candidates[best]["draw_avgs"][d if candidates[best]["draws"] == 2 else 0]


def test_the_docs_config_runs_as_written(own, monkeypatch, capsys):
    """docs/benchmark.md, "Your own models": its YAML and command, run in the layout of docs/own_models.md."""
    section = DOC.read_text().split("## Your own models", 1)[1]
    config = next(b for b in re.findall(r"```yaml\n(.*?)```", section, re.S) if "# my_models.yaml" in b)
    command = next(b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if "magic-pl benchmark" in b).split()
    monkeypatch.chdir(own["root"])
    monkeypatch.setattr(sys, "argv", ["magic-pl"])
    (own["root"] / "my_models.yaml").write_text(config)
    assert command[:2] == ["magic-pl", "benchmark"]
    main(command[1:])
    documented = yaml.safe_load(config)
    result = json.loads((own["root"] / documented["results_dir"] / "results.json").read_text())
    rows = _index(result)
    assert set(rows) == {("base", "none"), ("expert", "none")} | {
        (m, c) for m in documented["methods"] for c in documented["calibrations"]}
    for c in documented["calibrations"]:
        assert rows[("tsv_m", c)]["draws"] == (documented["draws"] if c in ("fsc", "dsc") else 1)
    assert result["config"]["merge_options"]["ties"]["density"] == 0.2
    # the same experts and test files as the fixture's run: the same reference rows
    for key in (("base", "none"), ("expert", "none"), ("task_arithmetic", "none"), ("task_arithmetic", "wsc")):
        assert rows[key]["per_task"] == _index(own["result"])[key]["per_task"]
    assert "| tsv_m | " in capsys.readouterr().out  # the report is printed


def _bad(config: dict, key: str, value=None) -> dict:
    """``config`` with ``key`` (dotted) set to ``value``, or removed when ``value`` is None."""
    out = json.loads(json.dumps(config))
    *parents, last = key.split(".")
    node = out
    for p in parents:
        node = node[p]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return out


@pytest.mark.parametrize(("key", "value", "code", "message"), [
    ("bogus", 1, 2, "bogus"),
    ("methods", ["ties", "no_such_merge"], 2, "methods: unknown merge method(s) ['no_such_merge']"),
    ("calibrations", ["none", "fsc:nope=1"], 2, "calibrations: 'fsc:nope=1'"),
    ("data.init_args.test.topic", None, 2, "data.init_args.test has no test set for task(s) ['topic']"),
    ("tasks", ["a"], 2, "tasks: option(s) of the built-in suites"),
    ("n_calib", 9, 2, "n_calib=9 is more than task 'sentiment' has: its calibration set holds 8"),
    ("merge_options", {"dare": {"p": 0.5}}, 2, "merge_options: ['dare'] are not among the run's methods"),
    ("merge_options", {"ties": {"density": 2.0}}, 2, "merge_options.ties:"),
    ("model.init_args.task_names", ["topic", "sentiment"], 2, "--model"),
    ("data.init_args.task_names", ["topic", "sentiment"], 2, "data.init_args.task_names ['topic', 'sentiment'] differ"),
])
def test_a_bad_config_fails_before_any_tensor_is_read(own, tmp_path, monkeypatch, capsys, key, value, code,
                                                      message):
    from magic_pl.models.sequence import HFClassifierAdapter

    def no_reading(self):
        raise AssertionError("a checkpoint was read")

    monkeypatch.setattr(HFClassifierAdapter, "setup", no_reading)
    config = _bad({**own["config"], "results_dir": str(tmp_path / "results")}, key, value)
    with pytest.raises(SystemExit) as exit_info:
        _benchmark(tmp_path / "bad.yaml", config)
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    print(err)
    assert message in err and "a checkpoint was read" not in err
    assert len(err.strip().splitlines()) <= 2  # the error and the hint, no traceback
    assert not (tmp_path / "results").exists()


def test_a_users_results_file_is_refused_before_work(own, tmp_path, monkeypatch, capsys):
    from magic_pl.models.sequence import HFClassifierAdapter

    monkeypatch.setattr(HFClassifierAdapter, "setup", lambda self: (_ for _ in ()).throw(AssertionError("read")))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "results.md").write_text("my notes\n")
    with pytest.raises(SystemExit):
        _benchmark(tmp_path / "bad.yaml", {**own["config"], "results_dir": str(tmp_path / "results")})
    assert "was not written by magic-pl" in capsys.readouterr().err
    assert (tmp_path / "results" / "results.md").read_text() == "my notes\n"



def test_timm_experts_on_tensor_files(tmp_path):
    """A TimmAdapter on the tiny ViT (safetensors) with test data in tensor files and no calibration sets (drawn from
    the test sets): the base and expert rows equal plain timm models built from the same files."""
    import timm
    from safetensors.torch import load_file, save_file

    from magic_pl.lightning.tiny_inputs import TINY_MODEL_KWARGS, TINY_MODEL_NAME, build_tiny_timm

    files = build_tiny_timm(tmp_path / "cache", num_classes=(3, 4))
    gen = torch.Generator().manual_seed(0)
    tests = {}
    for task, classes in (("a", 3), ("b", 4)):
        tests[task] = {"inputs": torch.randn(16, 3, 16, 16, generator=gen),
                       "label": torch.randint(0, classes, (16,), generator=gen)}
        save_file(tests[task], str(tmp_path / f"{task}.safetensors"))
    config = {
        "model": {"class_path": "magic_pl.models.TimmAdapter",
                  "init_args": {"model_name": TINY_MODEL_NAME, "base": str(files["base"]),
                                "experts": [str(files["a"]), str(files["b"])], "task_names": ["a", "b"],
                                "model_kwargs": TINY_MODEL_KWARGS}},
        "data": {"class_path": "magic_pl.lightning.TaskDataModule",
                 "init_args": {"task_names": ["a", "b"],
                               "test": {t: {"class_path": "magic_pl.lightning.TensorFileDataset",
                                            "init_args": {"path": str(tmp_path / f"{t}.safetensors")}}
                                        for t in ("a", "b")}}},
        "methods": ["task_arithmetic"], "calibrations": ["none", "dsc"], "n_calib": 1, "draws": 2,
        "bootstrap": 0, "progress": False, "results_dir": str(tmp_path / "results"),
    }
    result = _benchmark(tmp_path / "timm.yaml", config)
    rows = _index(result)
    assert set(rows) == {("base", "none"), ("expert", "none"), ("task_arithmetic", "none"),
                         ("task_arithmetic", "dsc")}
    assert rows[("task_arithmetic", "dsc")]["draws"] == 2 and result["config"]["calibration_from_test"]
    assert "from the test sets" in (tmp_path / "results" / "results.md").read_text()
    base = load_file(str(files["base"]))
    for task, data in tests.items():
        expert = load_file(str(files[task]))
        for row, body in (("expert", expert), ("base", base)):  # the base row: base body + the expert's head
            model = timm.create_model(TINY_MODEL_NAME, num_classes=int(expert["head.weight"].shape[0]),
                                      **TINY_MODEL_KWARGS)
            model.load_state_dict({**{k: v for k, v in body.items() if not k.startswith("head.")},
                                   **{k: v for k, v in expert.items() if k.startswith("head.")}})
            with torch.no_grad():
                accuracy = (model.eval()(data["inputs"]).argmax(-1) == data["label"]).float().mean().item()
            assert rows[(row, "none")]["per_task"][task] == pytest.approx(accuracy, abs=1e-6), (row, task)


def test_a_feature_step_without_coefficients_has_a_row_without_scales(own, tmp_path):
    # FeatCal rewrites weights in closed form and reports no xi: its row must summarise without scales
    config = {**own["config"], "methods": ["task_arithmetic"], "calibrations": ["none", "featcal"], "draws": 1,
              "results_dir": str(tmp_path / "fc")}
    rows = _index(_benchmark(tmp_path / "fc.yaml", config))
    row = rows[("task_arithmetic", "featcal")]
    assert "scales" not in row and row["draws"] == 1 and 0.0 <= row["avg"] <= 1.0
