"""``magic-pl`` failures print one or two lines (``magic-pl: error: <message naming the option or file>``) with exit
code 2 (bad command line or config), 1 (failed run) or 130 (Ctrl-C); the traceback only with --debug."""

from __future__ import annotations

import functools
import re
import signal
import sys
from pathlib import Path

import pytest

from magic_pl.lightning.cli import CLIError, main
from magic_pl.lightning.tiny_inputs import build_tiny_timm

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
#: Lightning's own start-up lines, printed before a run-time failure (everything else on stderr is magic-pl's)
_LIGHTNING_INFO = re.compile(r"^(INFO: )?(Seed set to|GPU available|TPU available|HPU available|"
                             r"Detected KeyboardInterrupt)")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_timm(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path, inputs):
    monkeypatch.setattr(sys, "argv", ["magic-pl"])
    monkeypatch.setenv("MAGIC_PL_CACHE", str(inputs["base"].parents[1]))
    monkeypatch.delenv("MAGIC_PL_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)


def _fail(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Run ``main(argv)``, expecting it to exit; returns (exit code, magic-pl's stderr lines)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not _LIGHTNING_INFO.match(ln)]
    return exc.value.code, lines


def _raising(method, exc: BaseException):
    """``method`` (same signature, so the CLI builds the same options from it) raising ``exc`` when called."""

    @functools.wraps(method)
    def raising(self, *args, **kwargs):
        raise exc

    return raising


def _experts(inputs: dict[str, Path]) -> str:
    return f"[{inputs['a']},{inputs['b']}]"


# (id, argv (INPUTS -> the tiny experts), allowed exit codes, regex for the first line)
CASES = [
    ("unknown merge method", ["calibrate", "-c", TINY, "--merge_method", "nosuch"],
     {2},  # checked in MagicModule.__init__, before the Trainer starts or any checkpoint is read
     r"unknown merge method 'nosuch'"),
    ("missing expert file", ["calibrate", "-c", TINY, "--base", "BASE", "--experts", "[nosuch.safetensors, B]"],
     {1, 2},  # the same: the adapter reads (and checks) its files when the run starts
     r"nosuch\.safetensors not found"),
    ("task names count mismatch", ["calibrate", "-c", TINY, "--base", "BASE", "--experts", "INPUTS",
                                   "--task_names", "[a, b, c]"],
     {2}, r"^--model\.init_args\.adapter \(.*TinyTimmAdapter\): 3 task names given for 2 experts"),
    ("task names count mismatch, tiny inputs", ["calibrate", "-c", TINY, "--task_names", "[a, b, c]"],
     {2}, r"^--model\.init_args\.adapter \(.*TinyTimmAdapter\): 3 task names for 2 built experts"),
    ("bad calibration string (shortcut)", ["calibrate", "-c", TINY, "--calibration", "bogus"],
     {2}, r"calibration.*bogus"),
    ("bad calibration string", ["calibrate", "-c", TINY, "--model.init_args.calibration", "bogus"],
     {2}, r"calibration.*bogus"),
    ("unknown --trainer option", ["calibrate", "-c", TINY, "--trainer.nosuch", "3"],
     {2}, r"^unrecognized arguments: --trainer\.nosuch 3$"),
    ("bad --trainer value", ["calibrate", "-c", TINY, "--trainer.devices", "xyz"],
     {2}, r"^--trainer \(.*MagicTrainer\): .*devices"),
    ("nonexistent config file", ["calibrate", "-c", "nosuch.yaml"],
     {2}, r"^-c/--config: File does not exist: .*nosuch\.yaml"),
    ("bad option type", ["calibrate", "-c", TINY, "--data.init_args.batch_size", "x"],
     {2}, r"^--data\.init_args\.batch_size: Expected .*int.*Got value: x"),
    ("unknown class", ["calibrate", "-c", TINY, "--model.init_args.adapter.class_path", "nosuch.Adapter"],
     {2}, r"^--model\.init_args\.adapter: .*nosuch"),
    ("data module __init__ raises", ["calibrate", "-c", TINY, "--data.init_args.samples_per_task", "0"],
     {2}, r"^--data \(.*TaskDataModule\): samples_per_task must be >= 1 .*got 0"),
    # count options of the data module: refused when it is built, before any tensor is read
    ("batch size 0", ["calibrate", "-c", TINY, "--data.init_args.batch_size", "0"],
     {2}, r"^--data \(.*TaskDataModule\): batch_size must be >= 1, got 0$"),
    ("negative calibration batch size", ["calibrate", "-c", TINY, "--data.init_args.calibration_batch_size", "-2"],
     {2}, r"^--data \(.*TaskDataModule\): calibration_batch_size must be >= 1, got -2$"),
    ("test_limit -1", ["calibrate", "-c", TINY, "--data.init_args.test_limit", "-1"],
     {2}, r"^--data \(.*TaskDataModule\): test_limit must be >= 1 \(or None: every sample\), got -1$"),
    ("negative num_workers", ["calibrate", "-c", TINY, "--data.init_args.num_workers", "-1"],
     {2}, r"^--data \(.*TaskDataModule\): num_workers must be >= 0, got -1$"),
    # test labels against the heads: task a's head has 3 classes; refused before calibration and scoring
    ("test labels outside the head", ["calibrate", "-c", TINY, "--data.init_args.test.a.init_args.num_classes", "7"],
     {1}, r"^the test set of task 'a' \(RandomTaskDataset with num_classes=7\): label [3-6] at index \d+ is outside "
          r"the 3 classes of the task's head \(0\.\.2\); \d+ of 21 labels are out of range$"),
    # benchmark counts: refused before any data is read or expert trained
    ("benchmark n_calib beyond the pool", ["benchmark", "--suite", "tiny", "--n_calib", "1000000000"],
     {1}, r"^n_calib=1000000000 is more than any task of suite 'tiny' has: its calibration pools \(the 'calib' "
          r"split\) hold at most 64 samples per task; use n_calib <= 64$"),
    ("benchmark draws 0", ["benchmark", "--suite", "tiny", "--draws", "0"], {1}, r"^draws must be >= 1, got 0$"),
    ("benchmark max_test 0", ["benchmark", "--suite", "tiny", "--max_test", "0"],
     {1}, r"^max_test must be >= 1 \(or None: the suite's test split\), got 0$"),
    ("shortcut the adapter does not take", ["calibrate", "--base", "x.safetensors"],
     {2}, r"^--base: the adapter magic_pl\.lightning\.demo\.DemoAdapter takes no 'base'"),
    ("half of the tiny inputs replaced", ["calibrate", "-c", TINY, "--experts", "INPUTS"],
     {2}, r"give both `base` and `experts`"),
    ("unknown subcommand", ["calibrat"], {2}, r"calibrat"),
]


@pytest.mark.parametrize("argv, codes, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_error_is_one_line(argv, codes, pattern, inputs, capsys):
    argv = [a.replace("INPUTS", _experts(inputs)).replace("BASE", str(inputs["base"]))
            .replace(", B]", f", {inputs['b']}]") for a in argv]
    code, lines = _fail(argv, capsys)
    assert code in codes, lines
    assert 1 <= len(lines) <= 2, lines
    assert lines[0].startswith("magic-pl: error: "), lines
    assert re.search(pattern, lines[0][len("magic-pl: error: "):]), lines[0]
    assert "Namespace(" not in lines[0] and "Union subtypes" not in lines[0]


def test_usage_errors_exit_2_and_run_errors_exit_1(monkeypatch, capsys):
    """The same message from the two phases: building the classes (a config problem) and running them."""
    from magic_pl.lightning.tiny_inputs import TinyTimmAdapter
    from magic_pl.lightning.trainer import MagicTrainer
    from magic_pl.statedict import CheckpointError

    real_init = TinyTimmAdapter.__init__
    monkeypatch.setattr(TinyTimmAdapter, "__init__", _raising(real_init, ValueError("broken in __init__")))
    assert _fail(["calibrate", "-c", TINY], capsys) == (
        2, ["magic-pl: error: --model.init_args.adapter (magic_pl.lightning.tiny_inputs.TinyTimmAdapter): broken "
            "in __init__", "magic-pl: magic-pl calibrate --help lists the options; --debug shows the traceback"])
    monkeypatch.setattr(TinyTimmAdapter, "__init__", real_init)
    for exc, text in ((CheckpointError("checkpoint x.safetensors: key 'w' is NaN"), "key 'w' is NaN"),
                      (FileNotFoundError(2, "No such file or directory", "data/x.jsonl"), "data/x.jsonl"),
                      (OSError(28, "No space left on device"), "No space left on device"),
                      (ValueError("a value"), "a value"),
                      (KeyError("missing"), "KeyError: key 'missing'")):
        monkeypatch.setattr(MagicTrainer, "calibrate", _raising(MagicTrainer.calibrate, exc))
        code, lines = _fail(["calibrate", "-c", TINY], capsys)
        assert code == 1 and len(lines) == 2 and text in lines[0], (exc, lines)
        assert lines[1] == "magic-pl: --debug (or MAGIC_PL_DEBUG=1) shows the traceback"


def test_debug_shows_the_traceback(monkeypatch, capsys):
    with pytest.raises(CLIError) as exc:  # the one-line error, chained to what the class raised
        main(["calibrate", "-c", TINY, "--task_names", "[a, b, c]", "--debug"])
    causes = []
    err = exc.value
    while err is not None:
        causes.append(err)
        err = err.__cause__
    assert any(type(c) is ValueError and str(c).startswith("3 task names for 2 built experts") for c in causes)
    assert capsys.readouterr().err.count("magic-pl: error") == 0
    monkeypatch.setenv("MAGIC_PL_DEBUG", "1")
    with pytest.raises(Exception, match="unrecognized arguments: --trainer.nosuch"):
        main(["calibrate", "-c", TINY, "--trainer.nosuch", "3"])
    monkeypatch.setenv("MAGIC_PL_DEBUG", "0")  # an explicit "off"
    assert _fail(["calibrate", "-c", TINY, "--trainer.nosuch", "3"], capsys)[0] == 2


def test_keyboard_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    from magic_pl.lightning.trainer import MagicTrainer

    monkeypatch.setattr(MagicTrainer, "calibrate", _raising(MagicTrainer.calibrate, KeyboardInterrupt()))
    assert _fail(["calibrate", "-c", TINY], capsys) == (130, ["magic-pl: interrupted"])


def test_keyboard_interrupt_inside_lightnings_loop_is_exit_130(monkeypatch, capsys):
    """Lightning catches Ctrl-C in its loops, shuts down and calls sys.exit(1); the CLI still reports 130."""
    from magic_pl.lightning.module import MagicModule

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(MagicModule, "predict_step", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    try:
        assert _fail(["calibrate", "-c", TINY, "--output_dir", "out"], capsys) == (130, ["magic-pl: interrupted"])
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after the first one


def test_benchmark_usage_error_is_one_line(monkeypatch, tmp_path, capsys):
    def run_benchmark(suite: str = "text", samples: int = 1):
        """Run a built-in offline benchmark suite."""
        raise AssertionError("not reached")

    import magic_pl.zoo

    monkeypatch.setattr(magic_pl.zoo, "run_benchmark", run_benchmark, raising=False)
    code, lines = _fail(["benchmark", "--samples", "many"], capsys)
    assert code == 2 and re.match(r"magic-pl: error: --samples: Expected .*int.*Got value: many", lines[0]), lines
    code, lines = _fail(["benchmark", "--nosuch", "1"], capsys)
    assert code == 2 and lines[0] == "magic-pl: error: unrecognized arguments: --nosuch 1", lines
    (tmp_path / "empty.yaml").write_text("{}\n")
    code, lines = _fail(["-c", "empty.yaml", "benchmark"], capsys)  # benchmark's options are its own: it comes first
    assert code == 2 and "magic-pl benchmark [options]" in lines[0], lines


@pytest.mark.parametrize("calibration", ["dsc", "fsc", "auto"])
def test_a_setting_that_needs_data_without_data_is_a_clear_error_before_any_work(calibration, capsys, tmp_path):
    code, lines = _fail(["calibrate", "-c", TINY, "--data", "null", "--calibration", calibration,
                         "--output_dir", "out"], capsys)
    assert code == 1 and len(lines) <= 2
    assert re.search(r"calibration '.*' .*needs unlabelled calibration samples, and no data was given.*--calibration "
                     "wsc", lines[0]), lines
    assert not (tmp_path / "out").exists()
