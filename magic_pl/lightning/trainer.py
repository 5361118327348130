"""``MagicTrainer``: a Lightning ``Trainer`` with a ``calibrate`` entry point (merge, WSC, FSC, save, evaluate).

``calibrate`` is also the ``magic-pl calibrate`` subcommand. With ``strategy="ddp"`` every process runs the whole
pipeline (weights stay identical on all ranks; rank 0 writes files). With Lightning's ``ModelParallelStrategy`` the
body is sharded over the processes (torch FSDP2; :meth:`MagicModule.configure_model
<magic_pl.lightning.module.MagicModule.configure_model>`) and gathered on rank 0 to be written. ``ddp_spawn`` is
refused: spawned workers do not hand the calibrated weights back between ``predict`` and ``test``.

The output directory is written as one unit (:class:`magic_pl.output.OutputLocation`): it is checked before any
tensor is read (a directory magic-pl did not write is never replaced without ``overwrite``; inputs inside it are
refused), everything goes to a hidden staging directory beside it, and the staging directory replaces the old output
only after the whole run, evaluation included, succeeded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional, Union

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden

__all__ = ["MagicTrainer", "input_paths"]


def input_paths(model: LightningModule) -> list[str]:
    """The checkpoint files a ``MagicModule`` reads (its adapter's base and experts, or its own sources)."""
    adapter = getattr(model, "adapter", None)
    found: list[Any] = []
    if adapter is not None:
        found += [getattr(adapter, "base_path", None), getattr(adapter, "path", None),
                  *(getattr(adapter, "expert_paths", None) or [])]
    found += [getattr(model, "_base_source", None), *(getattr(model, "_expert_sources", None) or [])]
    return [str(p) for p in found if isinstance(p, (str, os.PathLike))]


class MagicTrainer(Trainer):
    """``lightning.pytorch.Trainer`` plus :meth:`calibrate`."""

    def calibrate(
        self,
        model: LightningModule,
        datamodule: Optional[LightningDataModule] = None,
        output_dir: Optional[str] = None,
        save_model: bool = True,
        report: bool = True,
        evaluate: bool = True,
        hash_inputs: bool = True,
        overwrite: bool = False,
        compare: bool = True,
        model_card: bool = True,
        recipe: Optional[str] = None,
        select: Optional[list[Union[str, dict[str, Any]]]] = None,
        layerwise: bool = False,
    ) -> dict[str, Any]:
        """Merge, calibrate (WSC / FSC via ``predict``), save and evaluate (``test``) a ``MagicModule`` in one call.

        Args:
            model: a :class:`~magic_pl.lightning.module.MagicModule` (anything with its ``calibration_record``,
                ``needs_calibration_data`` and ``save_calibrated``).
            datamodule: calibration (``predict_dataloader``) and evaluation (``test_dataloader``) data.
            output_dir: where the calibrated model (``<output_dir>/model``) and the report
                (``<output_dir>/calibration_report.json`` / ``.png``) go; default ``None``: nothing is written.
            save_model: save the calibrated model under ``output_dir`` (default ``True``).
            report: write the calibration report under ``output_dir`` (default ``True``).
            evaluate: run ``trainer.test`` after calibration when there is test data (default ``True``).
            hash_inputs: store sha256 hashes of the input checkpoints in the report (default ``True``).
            overwrite: replace ``output_dir`` even if magic-pl did not write it (default ``False``).
            compare: when it evaluates, also evaluate on the same test data the uncalibrated merge and each expert on
                its own task, and give the calibration's gain with a paired 95% bootstrap interval (default ``True``;
                it merges once more and runs ``trainer.test`` K + 1 more times).
            model_card: write ``README.md`` into the saved model's directory (:func:`~magic_pl.lightning.card
                .model_card`: the merge, the calibration, xi and the accuracies measured here); default ``True``.
            recipe: the recipe file's text, quoted in the model card (``magic-pl merge`` passes it).
            select: candidate recipes (``"method@calibration"`` strings such as ``"ties@dsc"``, or mappings with
                ``merge_method``, ``merge_options``, ``calibration``): score each without labels on the calibration
                samples (:func:`~magic_pl.lightning.selection.select_recipe`: the outputs' distance to each task's
                expert) and calibrate, save and evaluate the best instead of ``model``'s own recipe; the scores go to
                the report (``selection``). Default none.
            layerwise: merge and calibrate one block at a time from the checkpoints on disk
                (:func:`~magic_pl.models.layerwise.layerwise_fsc`: memory is one block, whatever the model's size),
                with an ``output_dir``, for an adapter whose architecture has a
                :class:`~magic_pl.models.layerwise.BlockPlan`: a causal LM (``CausalLMAdapter``, Llama family) is
                written block by block; Hugging Face classifiers (``SequenceClassificationAdapter`` for BERT,
                ``ImageClassificationAdapter`` for ViT) have their shared encoder calibrated block by block (the
                heads differ per task and are kept, as on the whole-model path), then written with the heads in the
                adapter's layout, which holds the calibrated encoder once. The model is not held afterwards, so it
                is not evaluated here (``magic-pl test`` on the written model does). Default ``False``.

        Returns:
            ``{"metrics", "model", "report", "result", "comparison"}``: test metrics, the model and report paths
            (``None`` when not written), the :class:`~magic_pl.calibration.CalibrationResult` (``None`` if no
            calibration ran) and the comparison (``None`` without it; also in the report).
        """
        from magic_pl.lightning.report import write_report
        from magic_pl.output import OutputLocation

        launcher = getattr(self.strategy, "launcher", None)
        if launcher is not None and type(launcher).__name__ == "_MultiProcessingLauncher" and self.world_size > 1:
            raise ValueError(
                "calibrate cannot use a spawn-based strategy (ddp_spawn / ddp_notebook): the calibrated weights of the "
                "workers would be lost between predict and test. Use strategy='ddp'."
            )
        for attr in ("calibration_record", "needs_calibration_data"):
            if not hasattr(model, attr):
                raise TypeError(f"calibrate needs a MagicModule (or a module with {attr!r}), got "
                                f"{type(model).__name__}; add magic_pl.lightning.MagicCalibration to your Trainer "
                                "and call predict/test yourself")
        if layerwise:
            _check_layerwise(model, output_dir, save_model, select)
        if select is not None:
            from magic_pl.lightning.selection import parse_candidate

            for spec in select:  # every candidate checked before any tensor is read
                parse_candidate(spec)
            if not _has_predict_data(model, datamodule):
                raise ValueError("select scores candidate recipes on unlabelled samples, and no data was given: pass "
                                 "a data module with calibration or test sets")
        if model.needs_calibration_data and not _has_predict_data(model, datamodule):
            setting = getattr(getattr(model, "calibration", None), "to_string", lambda: "?")()
            raise ValueError(
                f"calibration {setting!r} (merge method {getattr(model, 'merge_method', '?')!r}) needs unlabelled "
                "calibration samples, and no data was given: pass a data module with calibration or test sets "
                "(--data ..., datamodule=), or choose a data-free setting (e.g. --calibration wsc)"
            )
        logs = _logs_for(self, output_dir) if output_dir is not None else None
        writes = output_dir is not None and (save_model or report or logs is not None)
        out = (OutputLocation(output_dir, overwrite=overwrite, inputs=input_paths(model)).check()
               if writes and self.is_global_zero else None)  # before any tensor is read
        staged: Optional[Path] = None
        with _Maybe(out):
            if out is not None:
                staged = out.stage()
                if logs is not None:
                    out.scratch("logs")  # the same path: removed with the staging if the run fails
            selection = None
            if select is not None:
                model, selection = self._select(model, datamodule, select)
            if layerwise:
                if staged is not None:
                    self._layerwise(model, datamodule, staged / "model")
                evaluate = False
                rank_zero_info("calibrate: layerwise, the model was written block by block and is not held; evaluate "
                               "the written model (magic-pl test, or from_pretrained)")
            elif model.needs_calibration_data:
                self.predict(model, datamodule=datamodule, return_predictions=False)
            else:
                model.build()
            rec = model.calibration_record
            if selection is not None:
                rec.config["selection"] = selection
            metrics: dict[str, float] = {}
            comparison: Optional[dict[str, Any]] = None
            if evaluate and _has_test_data(model, datamodule):
                metrics = self._accuracies(model, datamodule)
                if compare and callable(getattr(model, "uncalibrated", None)):
                    comparison = self._compare(model, datamodule, metrics)
                    rec.comparison = comparison
            elif evaluate:
                rank_zero_info("calibrate: no test data, skipping evaluation")
            final = Path(output_dir) if output_dir is not None else None
            if staged is None and save_model and output_dir is not None and getattr(model, "is_sharded", False):
                model.save_calibrated(None)  # a sharded model is gathered on rank 0: every rank takes part
            if staged is not None and save_model:
                start = time.perf_counter()
                saved = staged / "model" if layerwise else model.save_calibrated(staged / "model")
                if model_card:
                    _write_card(saved, rec, metrics, recipe, model)
                rec.outputs["model"] = str((final / "model").resolve())
                rec.add_step("write", time.perf_counter() - start)
            if staged is not None and report:
                write_report(rec, self, staged / "calibration_report.json", hash_inputs=hash_inputs)
            if out is not None:
                if logs is not None:
                    out.adopt(logs, "logs")
                out.commit({"command": "calibrate", "calibration": rec.config.get("calibration")})
            self.strategy.barrier("magic_pl_calibrate")
        result = getattr(getattr(model, "run", None), "result", None)
        return {
            "metrics": metrics,
            "model": str(final / "model") if final is not None and save_model else None,
            "report": str(final / "calibration_report.json") if final is not None and report else None,
            "result": result,
            "comparison": comparison,
        }

    def _layerwise(self, model: LightningModule, datamodule: Optional[LightningDataModule], output: Path) -> None:
        """:func:`~magic_pl.models.layerwise.layerwise_fsc` on ``model``'s adapter checkpoints and the data module's
        calibration samples, written to ``output`` (a classifier's calibrated body first beside it, then the adapter's
        layout with the heads); the record gets the pairing, xi and the memory it used."""
        import shutil

        from magic_pl.lightning.module import split_inputs
        from magic_pl.lightning.statistics import task_calls
        from magic_pl.merging import split_driver_args
        from magic_pl.models.layerwise import layerwise_fsc

        adapter = model.adapter
        body_of = _layerwise_body_of(adapter)
        datamodule.setup("predict")
        samples = []
        for batch in datamodule.predict_dataloader():
            task, args, kwargs, _ = split_inputs(batch)
            for t, a, kw in task_calls(task, args, kwargs):
                samples.append((t, dict(kw) if not a else a))
        options, driver = split_driver_args(model.merge_options)  # the driver's are layerwise_fsc's own arguments
        # a classifier's calibrated body goes beside the output (inside the staging directory), then into the
        # adapter's layout with the heads
        target = output if body_of is None else output.with_name(f".{output.name}-layerwise-body")
        report = layerwise_fsc(adapter.base_path, adapter.expert_paths, samples, target,
                               merge_method=model.merge_method, merge_options=options, calibration=model.calibration,
                               task_names=adapter.task_names, device=self.strategy.root_device,
                               sensitive=model.sensitive, body_of=body_of, **driver)
        if body_of is not None:
            start = time.perf_counter()
            _save_classifiers(model, target, output)
            shutil.rmtree(target)
            model.calibration_record.add_step("layerwise_save", time.perf_counter() - start)
        rec = model.calibration_record
        rec.task_names = list(adapter.task_names)
        rec.sources = {"base": adapter.base_path, "experts": list(adapter.expert_paths)}
        rec.config.update(model.describe())
        rec.config["layerwise"] = {k: getattr(report, k) for k in (
            "family", "mode", "segments", "device", "dtype", "peak_segment_bytes", "max_segment_bytes",
            "model_bytes")}
        rec.config["layerwise"]["calibrated"] = "model" if body_of is None else "shared body"
        rec.set_fold(report.calibration)
        rec.add_step("layerwise", report.seconds, segments=report.segments)

    def _select(self, model: LightningModule, datamodule: Optional[LightningDataModule],
                select: list[Union[str, dict[str, Any]]]) -> tuple[LightningModule, dict[str, Any]]:
        """The module of the best candidate recipe (a new ``MagicModule`` on ``model``'s checkpoints) and the
        selection's scores."""
        from magic_pl.lightning.module import MagicModule
        from magic_pl.lightning.selection import chosen, select_recipe

        result = select_recipe(model, datamodule, select, self)
        rank_zero_info(f"select: {result['best']} (mean distance to the experts "
                       f"{result['scores'][result['best']]:.4g} of {len(result['scores'])} candidates)")
        return MagicModule(**{**model._init_args, **dict(chosen(result))}), result

    def _accuracies(self, model: LightningModule, datamodule: Optional[LightningDataModule],
                    verbose: bool = True) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for d in self.test(model, datamodule=datamodule, verbose=verbose):
            metrics.update({k: float(v) for k, v in d.items()})
        return metrics

    def _compare(self, model: LightningModule, datamodule: Optional[LightningDataModule],
                 calibrated: dict[str, float]) -> dict[str, Any]:
        """The uncalibrated merge and each expert (on its own task) on the test data ``model`` was evaluated on, and
        the calibration's gain in average accuracy with a paired bootstrap interval (the same test examples
        resampled for both models)."""
        from magic_pl.lightning.metrics import bootstrap_ci

        reference = model.uncalibrated()
        if reference.needs_calibration_data:  # a data-based merge is merged from the calibration samples
            self.predict(reference, datamodule=datamodule, return_predictions=False)
        else:
            reference.build()
        merged = self._accuracies(reference, datamodule, verbose=False)
        mine, theirs = model.example_correctness, reference.example_correctness
        interval = None
        if mine and mine.keys() == theirs.keys():
            diff = {t: mine[t].double().numpy() - theirs[t].double().numpy() for t in mine}
            interval = [float(x) for x in bootstrap_ci(diff, samples=1000, seed=0)]
        experts = {}
        for task in model.task_names:
            reference.use_expert(task)
            experts[task] = self._accuracies(reference, datamodule, verbose=False).get(f"test/acc/{task}")
        avg = "test/acc/avg"
        return {
            "calibrated": calibrated, "uncalibrated": merged, "experts_on_own_task": experts,
            "gain": calibrated.get(avg, float("nan")) - merged.get(avg, float("nan")), "gain_ci95": interval,
        }


def _write_card(directory: Path, record: Any, metrics: dict[str, float], recipe: Optional[str],
                model: LightningModule) -> None:
    """``directory/README.md``: the model card, unless the saved model brought its own (e.g. copied support files)."""
    from magic_pl.lightning.card import model_card

    target = Path(directory) / "README.md"
    if not Path(directory).is_dir() or target.exists():
        return
    family = str((getattr(getattr(model, "merge_setup", None), "metadata", None) or {}).get("family", ""))
    library = "transformers" if family.startswith(("hf", "causal", "clip", "lora")) else (
        "timm" if family == "timm" else None)
    target.write_text(model_card(record, metrics=metrics, recipe=recipe, library=library))


class _Maybe:
    """``with`` an optional context manager."""

    def __init__(self, cm: Any) -> None:
        self.cm = cm

    def __enter__(self) -> Any:
        return self.cm.__enter__() if self.cm is not None else None

    def __exit__(self, *exc: Any) -> None:
        if self.cm is not None:
            self.cm.__exit__(*exc)


def _layerwise_body_of(adapter: Any) -> Optional[str]:
    """What :func:`~magic_pl.models.layerwise.layerwise_fsc` calibrates for ``adapter``: ``None`` for the whole model
    (causal LMs), else the classifier auto class whose shared body it calibrates (Hugging Face classifiers: their
    heads differ per task, so only the body is merged, as on the whole-model path)."""
    from magic_pl.models import HFClassifierAdapter

    return adapter.auto_class if isinstance(adapter, HFClassifierAdapter) else None


def _save_classifiers(model: LightningModule, body_dir: Path, output: Path) -> None:
    """The layerwise-calibrated body in ``body_dir`` written with the experts' heads to ``output`` by the classifier
    adapter's own ``save`` (its layout and ``save_options``, as ``save_calibrated``); holds the body once."""
    import transformers

    from magic_pl.models._hf import dtype_kwargs, from_pretrained_checked, load_config, meta_from_config
    from magic_pl.models.base import MergeSetup, find_tied_keys
    from magic_pl.statedict import validate_state_dict

    adapter = model.adapter
    auto = getattr(transformers, adapter.auto_class)
    base_cfg = load_config(adapter.base_path)
    skeleton = meta_from_config(auto, base_cfg)
    prefix = skeleton.base_model_prefix
    heads_of = [n for n, _ in skeleton.named_children() if n != prefix]
    del skeleton
    # loaded as the adapter loads its base: into the classifier class (its key conversions), the head left out
    full = from_pretrained_checked(auto, str(body_dir), name="the layerwise-calibrated body", config=base_cfg,
                                   allow_missing=tuple(f"{h}." for h in heads_of), **dtype_kwargs(adapter.dtype))
    body = getattr(full, prefix).eval()
    del full
    validate_state_dict(body.state_dict(), name="the calibrated model")  # no NaN/Inf is ever written
    heads = {task: adapter._load_head(auto, path, load_config(path), prefix, f"expert {task!r}")
             for task, path in zip(adapter.task_names, adapter.expert_paths)}
    setup = MergeSetup(base=body, experts=[{} for _ in adapter.task_names], task_names=list(adapter.task_names),
                       heads=heads, tied=find_tied_keys(body), adapter=adapter,
                       metadata={"family": "hf_classifier", "auto_class": adapter.auto_class, "body_prefix": prefix})
    setup.save(body, output, **model.save_options)


def _check_layerwise(model: LightningModule, output_dir: Any, save_model: bool, select: Any) -> None:
    """``layerwise`` needs checkpoints on disk, a place to write to and an architecture with a block plan (checked
    from the base's config, before any tensor is read)."""
    from magic_pl.models import CausalLMAdapter, HFClassifierAdapter

    adapter = getattr(model, "adapter", None)
    if not isinstance(adapter, (CausalLMAdapter, HFClassifierAdapter)):
        raise ValueError(
            "layerwise calibration reads checkpoints block by block: it runs for a causal LM "
            "(magic_pl.models.CausalLMAdapter, Llama family) or a Hugging Face classifier "
            "(SequenceClassificationAdapter for BERT, ImageClassificationAdapter for ViT), not for "
            f"{type(adapter).__name__ if adapter is not None else 'a module without an adapter'}; use the whole-model "
            "path (layerwise false)")
    config = Path(adapter.base_path) / "config.json"
    if config.is_file():  # otherwise layerwise_fsc says what is missing
        from transformers import AutoConfig

        from magic_pl.models.layerwise import block_plan

        try:
            block_plan(AutoConfig.from_pretrained(config.parent), _layerwise_body_of(adapter))
        except ValueError as err:
            raise ValueError(f"layerwise calibration ({type(adapter).__name__}): {err}; here: layerwise false") from err
    if output_dir is None or not save_model:
        raise ValueError("layerwise calibration writes the model as it goes: give an output_dir (and keep "
                         "save_model true)")
    if select is not None:
        raise ValueError("layerwise and select do not combine: select scores whole models")
    if not model.calibration.uses_data:
        raise ValueError(f"layerwise calibration needs a feature step; {model.calibration.to_string()!r} has none "
                         "(for a data-free setting the whole-model path streams already: layerwise false)")


def _logs_for(trainer: Trainer, output_dir: Any) -> Optional[Path]:
    """The scratch directory the loggers write this run's logs to (``magic-pl calibrate --output_dir`` points its CSV
    logger there), to be moved into the output as ``logs/`` once the run succeeded; ``None`` when no logger does.

    A logger writing inside the output directory itself is refused before any work: the output is replaced as a
    whole when the run succeeds, and a failed run must leave it exactly as it was.
    """
    from magic_pl.output import OutputError, scratch_path

    scratch = scratch_path(output_dir, "logs")
    root = Path(os.path.realpath(output_dir))
    found = None
    for logger in trainer.loggers:
        save_dir = getattr(logger, "save_dir", None)
        if not save_dir:
            continue
        real = Path(os.path.realpath(save_dir))
        if real == Path(os.path.realpath(scratch)):
            found = scratch
        elif real == root or root in real.parents:
            raise OutputError(
                f"logger {type(logger).__name__} writes to {save_dir}, inside the output directory {output_dir}, "
                "which magic-pl replaces as a whole after the run: give the logger a save_dir outside it (the "
                "magic-pl CLI's default logger already ends up in <output_dir>/logs)"
            )
    return found


def _has_predict_data(model: LightningModule, datamodule: Optional[LightningDataModule]) -> bool:
    source = datamodule if datamodule is not None else model
    return is_overridden("predict_dataloader", source)


def _has_test_data(model: LightningModule, datamodule: Optional[LightningDataModule]) -> bool:
    if datamodule is not None:
        test_sets = getattr(datamodule, "test_sets", None)
        if test_sets is not None:
            return bool(test_sets)
        return is_overridden("test_dataloader", datamodule)
    return is_overridden("test_dataloader", model)
