"""Recipe files: MergeKit's vocabulary plus magic-pl's calibration keys, run by ``magic-pl merge RECIPE OUT``.

A recipe names checkpoints only; the adapter is picked from them (:func:`detect_adapter`). Example::

    merge_method: ties                  # MergeKit's name (see MERGEKIT_METHODS), or any magic-pl method
    base_model: models/base
    models:
      - model: models/sentiment
        parameters: {weight: 1.0, density: 0.5}
      - model: models/topic
        parameters: {weight: 0.7, density: [0.3, 0.7]}   # a gradient over the layers
    parameters: {normalize: true, lambda: 1.0}
    dtype: float32                      # the output's dtype (magic-pl computes in float32)
    tokenizer_source: base              # or one of the models' paths
    # magic-pl's keys
    task_names: [sentiment, topic]      # default: the model folders' names
    calibration: dsc                    # default: dsc with calibration data, wsc without
    calibration_data: {sentiment: data/sentiment.txt, topic: {path: data/topic.csv, text_column: sentence}}
    test_data: {sentiment: data/sentiment_test.jsonl, topic: data/topic_test.jsonl}
    layerwise: false                    # true: merged and calibrated one block at a time (Llama, BERT, ViT)

MergeKit keys magic-pl does not run (``slices``, ``tokenizer``, ``chat_template``, ``modules``) are refused with the
reason; every key is checked before any checkpoint is read, and errors name the recipe file and the key. Paths are
relative to the current directory, as in MergeKit.
"""

from __future__ import annotations

import inspect
import json
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["Recipe", "RecipeError", "load_recipe", "detect_adapter", "build_recipe", "run_recipe",
           "MERGEKIT_METHODS"]

PathLike = Union[str, os.PathLike]

#: MergeKit method -> the options of :func:`magic_pl.merging.gta.gta` that make it (MergeKit 0.1.5's registry:
#: sparsification, consensus and the ``normalize`` / ``rescale`` defaults).
MERGEKIT_METHODS: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {},
    "ties": {"sparsify": "magnitude", "consensus": "sum", "normalize": True},
    "dare_ties": {"sparsify": "random", "consensus": "sum", "rescale": True},
    "dare_linear": {"sparsify": "random", "rescale": True},
    "breadcrumbs": {"sparsify": "magnitude_outliers"},
    "breadcrumbs_ties": {"sparsify": "magnitude_outliers", "consensus": "sum"},
    "della": {"sparsify": "della_magprune", "consensus": "sum", "normalize": True, "rescale": True},
    "della_linear": {"sparsify": "della_magprune", "rescale": True},
}
#: Per-model parameters (a model's ``parameters``, or the recipe's as a default for every model) -> gta option.
_PER_MODEL = {"weight": "weights", "density": "densities", "gamma": "gammas", "epsilon": "epsilons"}
#: Shared parameters -> gta option (``int8_mask`` only changes MergeKit's mask dtype: accepted, nothing to do).
_SHARED = {"normalize": "normalize", "rescale": "rescale", "lambda": "scale", "int8_mask": None}
_UNSUPPORTED = {
    "slices": "layer slicing (frankenmerges) is not a merge of task vectors; use MergeKit for it",
    "modules": "per-module recipes are not supported; write one recipe per module",
    "tokenizer": "vocabulary merging is not supported; use tokenizer_source: base (or a model's path)",
    "chat_template": "copy the chat template with tokenizer_source (a model's path)",
}
_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "name",
         "task_names", "calibration", "calibration_data", "test_data", "samples_per_task", "seed", "architecture",
         "model_kwargs", "push_to_hub", "private", "layout", "merge_options", "layerwise"}
_DTYPES = ("float32", "bfloat16", "float16")


class RecipeError(ValueError):
    """A recipe file is not valid; the message names the file and the key."""


@dataclass
class Recipe:
    """A parsed, checked recipe (see the module docstring). ``text`` is the file as given (quoted in the model card).
    """

    base_model: str
    models: list[str]
    task_names: Optional[list[str]]
    merge_method: str
    method: str
    merge_options: dict[str, Any]
    dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    calibration: Any = None
    calibration_data: dict[str, dict[str, Any]] = field(default_factory=dict)
    test_data: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples_per_task: int = 1
    seed: int = 0
    architecture: Optional[str] = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    push_to_hub: Optional[str] = None
    private: bool = True
    layout: str = "shared"
    layerwise: bool = False
    name: Optional[str] = None
    text: str = ""
    source: str = "recipe"


# --------------------------------------------------------------------------------------------------------------------
# Reading and checking
# --------------------------------------------------------------------------------------------------------------------
def _fail(where: str, key: str, message: str) -> RecipeError:
    return RecipeError(f"{where}: {key}: {message}")


def _path_value(where: str, key: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise _fail(where, key, f"must be a path, got {value!r}")
    return str(value)


def _data_entries(where: str, key: str, value: Any, tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{task: path | {path, text_column, ...}}`` (or a list in model order) -> ``{task: HFDataset init args}``."""
    from magic_pl.lightning.data import HFDataset

    if value is None:
        return {}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != len(tasks):
            raise _fail(where, key, f"{len(value)} entries for {len(tasks)} models (give one per model, or a "
                                    f"mapping task: path)")
        value = dict(zip(tasks, value))
    if not isinstance(value, Mapping):
        raise _fail(where, key, f"must map task names to data files, got {value!r}")
    allowed = set(inspect.signature(HFDataset.__init__).parameters) - {"self"}
    out = {}
    for task, entry in value.items():
        if task not in tasks:
            raise _fail(where, f"{key}.{task}", f"not a task of this recipe (tasks: {', '.join(tasks)})")
        entry = {"path": entry} if isinstance(entry, (str, os.PathLike)) else entry
        if not isinstance(entry, Mapping) or "path" not in entry:
            raise _fail(where, f"{key}.{task}", f"must be a path or {{path: ..., text_column: ...}}, got {entry!r}")
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise _fail(where, f"{key}.{task}.{unknown[0]}", f"unknown option; known: {', '.join(sorted(allowed))}")
        path = _path_value(where, f"{key}.{task}.path", entry["path"])
        if not Path(path).exists():
            raise _fail(where, f"{key}.{task}.path", f"{path} does not exist")
        out[task] = {**entry, "path": path}
    return out


def load_recipe(path: PathLike) -> Recipe:
    """Read and check the recipe file ``path`` (YAML); every key is checked here, before any checkpoint is read."""
    import yaml

    where = str(path)
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise RecipeError(f"cannot read the recipe {path}: {err.strerror or err}") from err
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{where}: not valid YAML: {err}") from err
    return parse_recipe(doc, text=text, source=where)


def parse_recipe(doc: Any, *, text: str = "", source: str = "recipe") -> Recipe:
    """A :class:`Recipe` from the recipe's parsed YAML ``doc`` (errors name ``source`` and the key)."""
    from magic_pl.merging.method import METHODS, get_method
    from magic_pl.merging.registry import validate_merge_options

    where = source
    if not isinstance(doc, Mapping):
        raise RecipeError(f"{where}: a recipe is a mapping with merge_method, base_model and models")
    for key, why in _UNSUPPORTED.items():
        if key in doc:
            raise _fail(where, key, why)
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise _fail(where, unknown[0], f"unknown key; known: {', '.join(sorted(_KEYS))}")
    for key in ("merge_method", "base_model", "models"):
        if doc.get(key) in (None, "", []):
            raise _fail(where, key, "is required")
    recipe_method = doc["merge_method"]
    if recipe_method not in MERGEKIT_METHODS and recipe_method not in METHODS:
        raise _fail(where, "merge_method", f"{recipe_method!r} is not supported; MergeKit methods: "
                                           f"{', '.join(MERGEKIT_METHODS)}; magic-pl methods: {', '.join(METHODS)}")
    base = _path_value(where, "base_model", doc["base_model"])
    entries = doc["models"]
    if not isinstance(entries, Sequence) or isinstance(entries, (str, bytes)):
        raise _fail(where, "models", "must be a list of {model: PATH, parameters: {...}}")
    models: list[str] = []
    base_weight = None
    per_model: list[dict[str, Any]] = []
    names: list[Optional[str]] = []
    for i, entry in enumerate(entries):
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise _fail(where, f"models[{i}]", f"must be {{model: PATH, parameters: {{...}}}}, got {entry!r}")
        extra = sorted(set(entry) - {"model", "parameters", "name"})
        if extra:
            raise _fail(where, f"models[{i}].{extra[0]}", "unknown key; known: model, parameters, name")
        path = _path_value(where, f"models[{i}].model", entry["model"])
        params = dict(entry.get("parameters") or {})
        if os.path.normpath(path) == os.path.normpath(base):
            # MergeKit lists the base among the models: skipped by its task-vector methods, averaged by linear
            if params and not (recipe_method == "linear" and set(params) == {"weight"}):
                raise _fail(where, f"models[{i}].parameters", "the base model takes no parameters here (linear "
                                                              "takes its weight)")
            base_weight = params.get("weight")
            continue
        models.append(path)
        per_model.append(params)
        names.append(entry.get("name"))
    if not models:
        raise _fail(where, "models", "lists no model other than base_model")
    for key, p in [("base_model", base), *((f"models[{i}].model", m) for i, m in enumerate(models))]:
        if not Path(p).exists():
            raise _fail(where, key, f"{p} does not exist (paths are relative to the current directory; hub ids "
                                    "are not downloaded by magic-pl merge)")
    task_names = doc.get("task_names")
    if task_names is None and any(n is not None for n in names):
        if not all(isinstance(n, str) for n in names):
            raise _fail(where, "models", "give every model a name, or none")
        task_names = names
    if task_names is not None:
        if not isinstance(task_names, Sequence) or isinstance(task_names, str) or len(task_names) != len(models):
            raise _fail(where, "task_names", f"must list {len(models)} names, one per model")
        from magic_pl.models.base import default_task_names

        try:
            task_names = default_task_names(models, list(task_names))
        except ValueError as err:
            raise _fail(where, "task_names", str(err)) from err
    tasks = task_names or _default_names(models)

    shared = dict(doc.get("parameters") or {})
    if recipe_method in MERGEKIT_METHODS:
        method = "gta"
        options: dict[str, Any] = dict(MERGEKIT_METHODS[recipe_method])
        for key, value in shared.items():
            if key in _SHARED:
                if _SHARED[key] is not None:
                    options[_SHARED[key]] = value
            elif key not in _PER_MODEL:
                raise _fail(where, f"parameters.{key}", f"not a parameter of {recipe_method}; known: "
                                                        f"{', '.join([*_SHARED, *_PER_MODEL])}")
        for i, params in enumerate(per_model):
            bad = sorted(set(params) - set(_PER_MODEL))
            if bad:
                raise _fail(where, f"models[{i}].parameters.{bad[0]}", f"not a per-model parameter; known: "
                                                                      f"{', '.join(_PER_MODEL)}")
        for key, option in _PER_MODEL.items():
            values = [params.get(key, shared.get(key)) for params in per_model]
            if any(v is not None for v in values):
                default = {"weight": 1.0, "density": 1.0, "gamma": 0.01, "epsilon": 0.15}[key]
                options[option] = [default if v is None else v for v in values]
        if recipe_method == "linear" and "weights" not in options:
            options["weights"] = [1.0] * len(models)
        if base_weight is not None:
            options["base_weight"] = base_weight
        options["num_layers"] = _layer_count(base)
    else:
        method = recipe_method
        if any(per_model):
            raise _fail(where, "models", f"per-model parameters are MergeKit's; the magic-pl method {method!r} "
                                         "takes its options under parameters")
        options = {**shared, **dict(doc.get("merge_options") or {})}
    options.setdefault("seed", doc.get("seed", 0))  # the random sparsifiers' (gta, dare, della): one seed per recipe
    if doc.get("merge_options") and recipe_method in MERGEKIT_METHODS:
        raise _fail(where, "merge_options", "set a MergeKit method's options under parameters")
    try:
        spec = get_method(method)
        validate_merge_options(method, dict(options))
        if spec.task_rule is not None:
            message = spec.task_rule(len(models), {**spec.defaults(), **options})
            if message:
                raise ValueError(message)
    except (ValueError, KeyError) as err:
        raise _fail(where, "parameters", str(err).strip("'\"")) from err

    dtype = doc.get("out_dtype", doc.get("dtype"))
    if dtype is not None and dtype not in _DTYPES:
        key = "out_dtype" if "out_dtype" in doc else "dtype"
        raise _fail(where, key, f"{dtype!r}: use one of {', '.join(_DTYPES)}")
    tokenizer_source = doc.get("tokenizer_source")
    if tokenizer_source is not None:
        if tokenizer_source == "base":
            tokenizer_source = base
        elif str(tokenizer_source).startswith("model:"):
            tokenizer_source = str(tokenizer_source)[len("model:"):]
        if tokenizer_source == "union":
            raise _fail(where, "tokenizer_source", "'union' merges vocabularies, which magic-pl does not do; use base "
                                                   "or a model's path")
        if tokenizer_source not in (base, *models):
            raise _fail(where, "tokenizer_source", f"{tokenizer_source!r} is neither base nor one of the models")
    calibration_data = _data_entries(where, "calibration_data", doc.get("calibration_data"), tasks)
    test_data = _data_entries(where, "test_data", doc.get("test_data"), tasks)
    calibration = doc.get("calibration")
    from magic_pl.calibration.settings import resolve_setting

    try:
        setting = resolve_setting(calibration if calibration is not None else
                                  ("dsc" if calibration_data or test_data else "wsc"))
    except (ValueError, TypeError) as err:
        raise _fail(where, "calibration", str(err)) from err
    if setting.uses_data and not (calibration_data or test_data):
        raise _fail(where, "calibration", f"{setting.to_string()!r} needs a few unlabelled samples per task: add "
                                          "calibration_data (e.g. {task: data/task.txt}), or use calibration: wsc")
    samples = doc.get("samples_per_task", 1)
    if isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or samples < 1:
        raise _fail(where, "samples_per_task", f"must be a positive integer, got {samples!r}")
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise _fail(where, "seed", f"must be an integer, got {seed!r}")
    layout = doc.get("layout", "shared")
    if layout not in ("shared", "per_task"):
        raise _fail(where, "layout", f"{layout!r}: use shared (one body + per-task heads) or per_task")
    layerwise = doc.get("layerwise", False)
    if not isinstance(layerwise, bool):
        raise _fail(where, "layerwise", f"must be true or false, got {layerwise!r}")
    hub = doc.get("push_to_hub")
    if hub is not None and (not isinstance(hub, str) or hub.count("/") != 1):
        raise _fail(where, "push_to_hub", f"must be a Hub repository id 'owner/name', got {hub!r}")
    return Recipe(
        base_model=base, models=models, task_names=task_names, merge_method=recipe_method, method=method,
        merge_options=options, dtype=dtype, tokenizer_source=tokenizer_source, calibration=setting.to_string(),
        calibration_data=calibration_data, test_data=test_data, samples_per_task=int(samples), seed=int(seed),
        architecture=doc.get("architecture"), model_kwargs=dict(doc.get("model_kwargs") or {}), push_to_hub=hub,
        private=bool(doc.get("private", True)), layout=layout, layerwise=layerwise, name=doc.get("name"), text=text,
        source=where,
    )


def _default_names(models: Sequence[str]) -> list[str]:
    from magic_pl.models.base import default_task_names

    return default_task_names(models, None)


def _layer_count(base: str) -> Optional[int]:
    """The base model's layer count for gradient parameters (from its tensor names; headers only)."""
    from magic_pl.merging.gta import layer_count
    from magic_pl.statedict import CheckpointError, load_state_dict

    path = Path(base)
    if path.is_dir():
        cfg = path / "config.json"
        if cfg.is_file():
            n = json.loads(cfg.read_text()).get("num_hidden_layers")
            if isinstance(n, int) and n > 0:
                return n
    try:
        return layer_count(list(load_state_dict(base).keys()))
    except (CheckpointError, OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------------------------
# The adapter, from the checkpoints
# --------------------------------------------------------------------------------------------------------------------
def _hf_config(path: str) -> Optional[dict[str, Any]]:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except ValueError as err:
        raise RecipeError(f"{cfg}: not valid JSON: {err}") from err


def adapter_for(base: str, models: Sequence[str], *, architecture: Optional[str] = None,
                where: str = "models") -> tuple[str, dict[str, Any]]:
    """``(adapter class path, init args)`` for a base and expert checkpoints, from what the files are:

    - PEFT adapter folders (``adapter_config.json``): :class:`~magic_pl.models.LoRAAdapter`;
    - Hugging Face folders, by the experts' ``architectures``: ``*ForSequenceClassification`` ->
      :class:`~magic_pl.models.SequenceClassificationAdapter`, ``*ForImageClassification`` ->
      :class:`~magic_pl.models.ImageClassificationAdapter`, ``*ForCausalLM`` / ``*LMHeadModel`` ->
      :class:`~magic_pl.models.CausalLMAdapter`;
    - timm: folders with timm's ``config.json`` (``architecture``), or weight files and ``architecture`` ->
      :class:`~magic_pl.models.TimmAdapter`.

    The init args hold the checkpoints (``base``, ``experts`` / ``adapters``, timm's ``model_name``). Raises
    :class:`RecipeError` naming ``where`` when the files fit none of these.
    """
    models = [str(m) for m in models]
    if all((Path(m) / "adapter_config.json").is_file() for m in models):
        return "magic_pl.models.LoRAAdapter", {"base": base, "adapters": models}
    configs = [_hf_config(m) if Path(m).is_dir() else None for m in models]
    if all(c is not None for c in configs):
        timm_arch = {c.get("architecture") for c in configs if "architecture" in c}
        if timm_arch:
            if len(timm_arch) != 1 or any("architecture" not in c for c in configs):
                raise RecipeError(f"{where}: the timm folders name different architectures {timm_arch}")
            return _timm(base, architecture, timm_arch.pop(), [_weights_in(m) for m in models], where)
        kinds = {tuple(c.get("architectures") or ()) for c in configs}
        if len(kinds) != 1 or not next(iter(kinds)):
            raise RecipeError(f"{where}: the experts' config.json name different (or no) architectures "
                              f"{sorted(kinds)}; magic-pl merges experts of one architecture")
        arch = next(iter(kinds))[0]
        for suffix, cls in (("ForSequenceClassification", "SequenceClassificationAdapter"),
                            ("ForImageClassification", "ImageClassificationAdapter"),
                            ("ForCausalLM", "CausalLMAdapter"), ("LMHeadModel", "CausalLMAdapter")):
            if arch.endswith(suffix):
                return f"magic_pl.models.{cls}", {"base": base, "experts": models}
        raise RecipeError(f"{where}: architecture {arch} has no adapter picked from files (sequence / image "
                          "classifiers, causal LMs, LoRA adapters, timm); write a magic-pl calibrate config with its "
                          "adapter (docs/own_models.md)")
    if all(Path(m).is_file() for m in models):
        if not architecture:
            raise RecipeError(f"{where}: the models are weight files without a config; name the timm architecture "
                              "(recipe key architecture:, e.g. resnet18)")
        return _timm(base, architecture, architecture, models, where)
    raise RecipeError(f"{where}: a mix of folders and files, or folders without config.json: {', '.join(models)}")


def detect_adapter(recipe: Recipe) -> Any:
    """The :class:`~magic_pl.models.base.ModelAdapter` for the recipe's checkpoints (:func:`adapter_for`), with the
    recipe's task names, layout and timm model kwargs."""
    from magic_pl.lightning.cli_errors import import_class

    class_path, args = adapter_for(recipe.base_model, recipe.models, architecture=recipe.architecture,
                                   where=f"{recipe.source}: models")
    cls = import_class(class_path)
    args["task_names"] = recipe.task_names or _default_names(recipe.models)
    if "layout" in inspect.signature(cls.__init__).parameters:
        args["layout"] = recipe.layout
    if class_path.endswith("TimmAdapter") and recipe.model_kwargs:
        args["model_kwargs"] = recipe.model_kwargs
    return cls(**args)


def _weights_in(folder: str) -> str:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    raise RecipeError(f"{folder}: a timm folder without model.safetensors or pytorch_model.bin")


def _timm(base: str, given: Optional[str], arch: str, experts: list[str], where: str) -> tuple[str, dict[str, Any]]:
    if given and given != arch:
        raise RecipeError(f"{where}: architecture {given!r}, but the models' config.json says {arch!r}")
    return "magic_pl.models.TimmAdapter", {"model_name": arch, "experts": experts,
                                           "base": _weights_in(base) if Path(base).is_dir() else base}


# --------------------------------------------------------------------------------------------------------------------
# Building and running
# --------------------------------------------------------------------------------------------------------------------
def build_recipe(recipe: Recipe) -> tuple[Any, Any]:
    """``(MagicModule, TaskDataModule or None)`` for ``recipe``: what ``magic-pl calibrate`` would build from the
    equivalent config."""
    from magic_pl.lightning.data import HFDataset, TaskDataModule
    from magic_pl.lightning.module import MagicModule
    from magic_pl.models import HFClassifierAdapter, TimmAdapter

    adapter = detect_adapter(recipe)
    save: dict[str, Any] = {}
    if recipe.dtype is not None:
        save["dtype"] = recipe.dtype
    if isinstance(adapter, TimmAdapter) and recipe.layout == "shared":
        save["full_checkpoints"] = False
    if isinstance(adapter, HFClassifierAdapter) and recipe.tokenizer_source is not None:
        save["support_from"] = recipe.tokenizer_source
    model = MagicModule(adapter=adapter, merge_method=recipe.method, merge_options=recipe.merge_options,
                        calibration=recipe.calibration, save_options=save or None)
    if not (recipe.calibration_data or recipe.test_data):
        return model, None
    tasks = list(adapter.task_names)
    processor = _processor_for(recipe)
    if isinstance(adapter, TimmAdapter):  # timm models take the image batch positionally
        processor["image_key"] = "inputs"

    def dataset(entry: Mapping[str, Any], labelled: bool) -> Any:
        args = {**processor, **entry}
        if not labelled:
            args.setdefault("label_column", None)
        return HFDataset(**args)

    data = TaskDataModule(
        task_names=tasks,
        test={t: dataset(e, True) for t, e in recipe.test_data.items()} or None,
        calibration={t: dataset(e, False) for t, e in recipe.calibration_data.items()} or None,
        samples_per_task=recipe.samples_per_task, seed=recipe.seed,
    )
    return model, data


def _processor_for(recipe: Recipe) -> dict[str, str]:
    """The tokenizer / image processor the data files are read with: the tokenizer source's (default the base's)."""
    for folder in [p for p in (recipe.tokenizer_source, recipe.base_model, *recipe.models) if p]:
        path = Path(folder)
        if not path.is_dir():
            continue
        if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
            return {"tokenizer": str(path)}
        if (path / "preprocessor_config.json").is_file():
            return {"image_processor": str(path)}
    return {}


def run_recipe(recipe: Union[Recipe, PathLike], output_dir: PathLike, *, overwrite: bool = False,
               evaluate: bool = True, compare: bool = True, push_to_hub: Optional[str] = None,
               trainer: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Merge and calibrate as ``recipe`` says, write the model (with its card) and the report under ``output_dir``
    (``<output_dir>/model``, ``calibration_report.json``), through :meth:`MagicTrainer.calibrate`; then upload
    ``<output_dir>/model`` to ``push_to_hub`` (default: the recipe's ``push_to_hub``; none: no upload).

    ``trainer``: ``MagicTrainer`` options (default one CPU/GPU device, no logger, no checkpointing).
    """
    from lightning.pytorch import seed_everything

    from magic_pl.lightning.trainer import MagicTrainer

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    hub = push_to_hub or recipe.push_to_hub
    seed_everything(recipe.seed, verbose=False)
    model, data = build_recipe(recipe)
    options = {"accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False,
               "enable_model_summary": False, **dict(trainer or {})}
    result = MagicTrainer(**options).calibrate(model, datamodule=data, output_dir=str(output_dir),
                                               overwrite=overwrite, evaluate=evaluate, compare=compare,
                                               recipe=recipe.text or None, layerwise=recipe.layerwise)
    if hub and result.get("model"):
        result["hub"] = upload(result["model"], hub, private=recipe.private)
    return result


def upload(folder: PathLike, repo_id: str, *, private: bool = True) -> str:
    """Upload ``folder`` to the Hugging Face Hub repository ``repo_id`` (created if needed; private by default);
    returns the repository's URL. Needs a Hub token (``huggingface-cli login`` or ``HF_TOKEN``)."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="magic-pl merge")
    return str(url)
