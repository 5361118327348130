"""Big models: merge + WSC streamed tensor by tensor from (sharded) safetensors, and FSC over lazily read sources.

:func:`stream_merge` never holds a model: for each key it reads the base tensor and the K expert tensors (with
``pread``, no memory map, see :class:`~magic_pl.models.io.SafetensorsReader`), merges them
(:func:`magic_pl.merging.merge` on that one key), applies the calibration setting's data-free weight steps to that
key (:func:`magic_pl.calibration.settings.apply_weight_steps`; each must be ``row_separable``), writes
``base + tau`` into its planned place in an output shard (:class:`~magic_pl.models.io.ShardedSafetensorsWriter`)
and frees everything. For the row-separable methods (``MergeMethod.row_separable``: weight average, task arithmetic,
consensus, ...; WSC is row-wise by definition, docs/method.md, WSC) large tensors are processed in blocks of rows
bounded by ``chunk_bytes``, so the peak working set does not grow with K or with the largest tensor. Other methods
(TIES, DARE, TSV-M, ...) need whole tensors: the peak is then the K float32 task-vector slices of the largest tensor
plus the method's own temporaries (the weight steps still run in row blocks).

:func:`lazy_calibration_sources` and :func:`streaming_fsc` run FSC on a merged model held in memory while the base
and expert tensors are read from disk one module at a time (``FeatureSpaceCalibrator`` takes mappings).

The per-key arithmetic (:func:`merge_request` checks a request, :class:`KeyMerger` merges one key's row blocks and
applies the weight steps) is shared with :func:`magic_pl.models.layerwise.layerwise_fsc`, which merges and calibrates
one block at a time when the merged model does not fit in memory either.
"""

from __future__ import annotations

import json
import os
import time
import types
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from magic_pl.models.base import find_tied_keys
from magic_pl.models.io import (
    SafetensorsReader,
    ShardedSafetensorsWriter,
    copy_support_files,
    parse_size,
)
from magic_pl.statedict import (
    CheckpointError,
    LazyStateDict,
    LazyTaskVector,
    StateDict,
    apply_delta,
    compute_dtype,
    is_mergeable,
    key_mismatch_error,
    load_state_dict,
    shape_error,
    tensor_dtype,
    tensor_file,
    tensor_shape,
    tensor_task_vector,
)

__all__ = [
    "StreamReport",
    "stream_merge",
    "open_checkpoint",
    "check_headers",
    "resolve_device",
    "AliasView",
    "lazy_calibration_sources",
    "streaming_fsc",
    "LazyTaskVector",
]

PathLike = Union[str, os.PathLike]


def resolve_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; anything else as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def open_checkpoint(path: PathLike, *, drop_page_cache: bool = False, reader: str = "pread") -> StateDict:
    """A lazily read checkpoint.

    ``reader="pread"`` (default): :class:`~magic_pl.models.io.SafetensorsReader` for safetensors sources (file, index,
    directory); ``"mmap"``: :func:`~magic_pl.statedict.load_state_dict` (``safe_open``, memory-mapped: pages it
    touched stay in the process's RSS while the file is open). Non-safetensors sources always go through
    ``load_state_dict`` (torch files are loaded whole).
    """
    if reader not in ("pread", "mmap"):
        raise ValueError(f"reader must be 'pread' or 'mmap', got {reader!r}")
    if reader == "pread" and _is_safetensors_source(Path(path)):
        return SafetensorsReader.from_path(path, drop_page_cache=drop_page_cache)
    return load_state_dict(path)


def _is_safetensors_source(path: Path) -> bool:
    if path.is_dir():
        return any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))
    return path.name.endswith((".safetensors", ".safetensors.index.json"))


def _file(sd: StateDict, key: str) -> str:
    return str(tensor_file(sd, key) or "in memory")


def _config_dict(path: PathLike) -> Optional[dict[str, Any]]:
    p = Path(path)
    cfg = (p if p.is_dir() else p.parent) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except ValueError:
        return None


def check_headers(base: StateDict, experts: Sequence[StateDict], names: Sequence[str]) -> None:
    """Key sets, shapes and float-ness of every expert against the base, from headers only (no tensor data read).

    Raises :class:`~magic_pl.statedict.CheckpointError` naming the expert and key (with a vocabulary hint for
    embedding tables, and a tying hint for a lone ``lm_head.weight``).
    """
    base_keys = list(base.keys())
    bset = set(base_keys)
    for name, e in zip(names, experts):
        eset = set(e.keys())
        hint = ""
        if any("lm_head" in k for k in bset ^ eset):
            hint = " (one side ties lm_head to the input embeddings and the other does not?)"
        mismatch = key_mismatch_error(name, bset, eset, hint=hint)
        if mismatch is not None:
            raise mismatch
        for key in base_keys:
            bs, es = tuple(tensor_shape(base, key)), tuple(tensor_shape(e, key))
            if bs != es:
                raise shape_error(name, key, bs, es)
            bf, ef = is_mergeable(tensor_dtype(base, key)), is_mergeable(tensor_dtype(e, key))
            if bf != ef:
                raise CheckpointError(
                    f"{name}: dtype mismatch for {key!r}: base {tensor_dtype(base, key)} vs expert "
                    f"{tensor_dtype(e, key)} (a float tensor is needed on both sides)"
                )


def check_configs(base: PathLike, experts: Sequence[PathLike], names: Sequence[str]) -> None:
    """Compare the ``config.json`` architecture fields of the base and every expert, where both have one
    (:func:`magic_pl.models._hf.check_config`: a :class:`~magic_pl.statedict.CheckpointError` naming the field)."""
    from magic_pl.models._hf import check_config as _check_config

    bcfg = _config_dict(base)
    if bcfg is None:
        return
    for name, e in zip(names, experts):
        ecfg = _config_dict(e)
        if ecfg is not None:
            _check_config(types.SimpleNamespace(**bcfg), types.SimpleNamespace(**ecfg), name)


@dataclass
class StreamReport:
    """What :func:`stream_merge` did.

    Attributes:
        output: the written directory.
        method, method_options, wsc, wsc_options: the settings used.
        tensors: tensors written; merged: float tensors merged; calibrated: tensors WSC changed (had >= 1 row scaled);
        copied: non-float tensors copied from the base.
        chunked: tensors processed in row blocks.
        bytes_written: tensor bytes in the output shards.
        seconds: wall time.
        device: where the arithmetic ran.
        shards: output shard file names.
        wsc_mean_scale: tensor key -> mean WSC row scale.
    """

    output: str
    method: str
    method_options: dict[str, Any]
    wsc: bool
    wsc_options: dict[str, Any]
    tensors: int = 0
    merged: int = 0
    calibrated: int = 0
    copied: int = 0
    chunked: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    shards: list[str] = field(default_factory=list)
    wsc_mean_scale: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _KeyReader:
    """Row blocks of one key: read with ``pread`` per block, or (other mappings) the whole tensor once, then sliced."""

    def __init__(self, sd: StateDict, key: str):
        self.sd, self.key = sd, key
        self.full: Optional[Tensor] = None

    def rows(self, start: Optional[int], stop: Optional[int]) -> Tensor:
        if start is None:
            return self.sd[self.key]
        if isinstance(self.sd, LazyStateDict):
            return self.sd.read_rows(self.key, start, stop)
        if self.full is None:
            self.full = self.sd[self.key]
        return self.full[start:stop]


@dataclass(frozen=True)
class MergeRequest:
    """A checked merge + weight-step request of the streamed paths (:func:`merge_request`).

    Attributes:
        method: the merge method's name; options: its options.
        setting: the resolved calibration setting (its weight steps all ``row_separable``).
        sensitive: the sensitive set its steps use (``None``: no gating, no cap).
    """

    method: str
    options: dict[str, Any]
    setting: Any
    sensitive: Optional[list[str]]


def whole_model_method_error(method: str, caller: str) -> str:
    """The refusal of a per-tensor path for a method whose prepass always runs (LARV's per-layer scales)."""
    return (f"merge method {method!r} needs every tensor before the first is merged; {caller} merges per tensor (use "
            "magic_pl.merging.merge_models for a pass over the whole model)")


def merge_request(merge_method: str, merge_options: Optional[Mapping[str, Any]], calibration: Any,
                  sensitive: Optional[Union[str, PathLike, Collection[str]]], *, caller: str,
                  feature: bool = False) -> MergeRequest:
    """Check a streamed merge request: the method exists and merges per tensor (no ``global_topk``, no method whose
    prepass always runs, e.g. ``larv``), the setting's weight steps are row-separable, and a setting that detects its
    sensitive set on data got one (``feature``: the caller also runs the feature step, whose cap needs the set too).
    ``caller`` names the front door in errors."""
    from magic_pl.calibration.settings import resolve_setting
    from magic_pl.merging import MERGE_METHODS

    if merge_method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {merge_method!r}; valid methods: {', '.join(MERGE_METHODS)}")
    spec = MERGE_METHODS[merge_method]
    if spec.prepass_required:
        raise ValueError(whole_model_method_error(merge_method, caller))
    setting = resolve_setting(calibration)
    whole_model = [s.name for s in setting.weight_steps if not s.row_separable]
    if whole_model:
        raise ValueError(f"{caller}: calibration {setting.to_string()!r}: the weight step(s) {whole_model} need "
                         "the whole model, not one key's row block at a time; merge with calibration='none' and "
                         "calibrate the loaded model instead")
    uses_set = setting.uses_wsc or (feature and setting.uses_data)
    if uses_set and setting.detects and sensitive is None:
        raise ValueError(f"{caller}: calibration {setting.to_string()!r} detects its sensitive set on data, which "
                         "a streamed merge does not see; give sensitive= (names or a ranking JSON of "
                         "magic_pl.calibration.save_sensitivity)")
    sens = setting.resolve_sensitive(sensitive) if uses_set else None
    opts = dict(merge_options or {})
    whole = [k for k in spec.driver_options if opts.get(k)]
    if whole:
        raise ValueError(f"{', '.join(whole)} needs every tensor before the first is merged; {caller} merges per "
                         "tensor (use magic_pl.merging.merge_models for a pass over the whole model)")
    return MergeRequest(merge_method, opts, setting, sens)


@dataclass
class KeyMergeStats:
    """What :meth:`KeyMerger.rows` did for one key: its rows, whether it went in row blocks, WSC's summed row scales,
    whether a weight step changed it, and (on request) the merged task vector's squared norm."""

    rows: int = 1
    chunked: bool = False
    scale_sum: float = 0.0
    changed: bool = False
    #: set ``track_norms`` to get ``merged_sq``: the squared norm of the merged task vector before the weight steps
    track_norms: bool = False
    merged_sq: float = 0.0


class KeyMerger:
    """Merge + the row-separable weight steps of one key at a time, from lazily read checkpoints: the arithmetic of
    :func:`stream_merge`, shared by the layer-by-layer path (:mod:`magic_pl.models.layerwise`).

    Args:
        base_sd, expert_sds: the base and the K experts (mappings read one key, or one row block, at a time).
        request: the checked request (:func:`merge_request`).
        bn_stats, seed: as in :func:`magic_pl.merging.merge`.
        device: where the arithmetic runs.
        chunk_bytes: working-set bound per block of rows for row-separable methods.
    """

    def __init__(self, base_sd: StateDict, expert_sds: Sequence[StateDict], request: MergeRequest, *,
                 bn_stats: str = "average", seed: int = 0, device: Union[str, torch.device] = "cpu",
                 chunk_bytes: Union[int, str] = "256MB"):
        from magic_pl.merging import MERGE_METHODS

        self.base_sd, self.expert_sds, self.request = base_sd, list(expert_sds), request
        self.bn_stats, self.seed, self.device = bn_stats, seed, torch.device(device)
        self.chunk_limit = parse_size(chunk_bytes)
        spec = MERGE_METHODS[request.method]
        if spec.prepass_required:  # a MergeRequest built by hand, not by merge_request
            raise ValueError(whole_model_method_error(request.method, "KeyMerger"))
        self.row_separable = spec.row_separable

    def rows(self, key: str, shape: Sequence[int], dtype: torch.dtype, stats: KeyMergeStats, *,
             row_range: Optional[tuple[int, int]] = None
             ) -> Iterator[tuple[Optional[int], Tensor, list[Tensor], Tensor]]:
        """``(start, base, taus, merged_tau)`` per row block of the floating key ``key`` (one block, ``start=None``,
        unless a row-separable method's working set exceeds ``chunk_bytes``): the base rows in
        :func:`~magic_pl.statedict.compute_dtype`, the K float32 task-vector rows (each expert read once) and the
        merged task vector after the weight steps. ``stats`` is filled as the blocks go.

        ``row_range=(lo, hi)``: only rows ``lo:hi`` are needed (one rank's shard). A row-separable method then reads
        and merges those rows only; any other method still needs the whole tensor (one block, ``start=None``) and
        the caller takes the rows it needs."""
        from magic_pl.calibration.settings import apply_weight_steps
        from magic_pl.merging import merge

        K = len(self.expert_sds)
        setting, sens, method, opts = self.request.setting, self.request.sensitive, self.request.method, \
            self.request.options
        wsc = setting.uses_wsc
        numel_row = 1
        for s in shape[1:]:
            numel_row *= int(s)
        rows = int(shape[0]) if len(shape) else 1
        stats.rows = rows
        # float32 working set per row: K task rows, WSC's [K, rows, in] stack and its squares, base, merged,
        # calibrated, output
        per_row = numel_row * 4 * (3 * K + 6)
        blocks: list[tuple[Optional[int], Optional[int]]] = [(None, None)]
        lo, hi = (0, rows) if row_range is None else (max(0, row_range[0]), min(rows, row_range[1]))
        if self.row_separable and len(shape) >= 1 and (lo, hi) != (0, rows):
            if hi <= lo:
                return
            step = max(1, self.chunk_limit // per_row)
            blocks = [(s, min(hi, s + step)) for s in range(lo, hi, step)]
            stats.chunked = len(blocks) > 1
        elif self.row_separable and len(shape) >= 1 and rows > 1 and per_row * rows > self.chunk_limit:
            step = max(1, self.chunk_limit // per_row)
            blocks = [(s, min(rows, s + step)) for s in range(0, rows, step)]
            stats.chunked = True
        base_rd = _KeyReader(self.base_sd, key)
        expert_rds = [_KeyReader(e, key) for e in self.expert_sds]
        for start, stop in blocks:
            bc = base_rd.rows(start, stop).to(self.device)
            bc = bc.to(compute_dtype(dtype))  # converted once: for the K differences and base + tau
            # one read per block: the difference is checked for NaN/Inf as it is computed
            taus = [tensor_task_vector(rd.rows(start, stop).to(self.device), bc, key,
                                       name=f"expert {j} ({_file(e, key)})",
                                       base_name=f"base ({_file(self.base_sd, key)})")
                    for j, (rd, e) in enumerate(zip(expert_rds, self.expert_sds))]
            merged = merge(method, [{key: t} for t in taus], bn_stats=self.bn_stats, seed=self.seed, **opts)[key]
            if stats.track_norms:
                stats.merged_sq += float(merged.double().pow(2).sum())
            if wsc:
                # the steps are row-separable: run them on row sub-blocks of the held slices (views, no copies), so
                # WSC's [K, rows, in] stack stays within chunk_bytes even when the method needed whole tensors
                n = merged.shape[0] if merged.dim() >= 2 else 1
                sub = n if merged.dim() < 2 else max(1, self.chunk_limit // max(1, numel_row * 4 * (2 * K + 2)))
                for r0 in range(0, n, sub):
                    sl = slice(r0, min(n, r0 + sub)) if merged.dim() >= 2 else slice(None)
                    cal, scales = apply_weight_steps(setting.weight_steps, {key: merged[sl]},
                                                     [{key: t[sl]} for t in taus], sens)
                    if key in scales:
                        lam = scales[key]
                        stats.scale_sum += float(lam.sum())
                        stats.changed = stats.changed or bool((lam != 1).any())
                    elif key in cal:
                        stats.changed = stats.changed or not torch.equal(cal[key], merged[sl])
                    if key in cal:
                        merged[sl] = cal[key]
            yield start, bc, taus, merged
            del bc, taus, merged


def stream_merge(
    base: PathLike,
    experts: Sequence[PathLike],
    output: PathLike,
    *,
    merge_method: str = "task_arithmetic",
    merge_options: Optional[Mapping[str, Any]] = None,
    calibration: Any = "wsc",
    sensitive: Optional[Union[str, PathLike, Collection[str]]] = None,
    bn_stats: str = "average",
    seed: int = 0,
    device: Optional[Union[str, torch.device]] = "auto",
    max_shard_size: Union[int, str] = "5GB",
    chunk_bytes: Union[int, str] = "256MB",
    copy_support: bool = True,
    drop_page_cache: bool = False,
    check_config: bool = True,
    reader: str = "pread",
    progress: bool = False,
    overwrite: bool = False,
    method: Optional[str] = None,
    method_options: Optional[Mapping[str, Any]] = None,
) -> StreamReport:
    """Merge K experts of one base and apply WSC, streaming tensor by tensor, into a sharded safetensors directory.

    Args:
        base: the base checkpoint (directory with ``model.safetensors[.index.json]``, an index file, or a
            ``.safetensors`` file).
        experts: the K expert checkpoints, same layout and keys as the base.
        output: the output directory (written to a temporary directory and renamed into place). It is replaced only
            when empty, a previous magic-pl output, or with ``overwrite``; it may not hold the base or an expert.
        merge_method: a merge method of :data:`magic_pl.merging.MERGE_METHODS` (default ``"task_arithmetic"``).
        merge_options: the method's options (e.g. ``{"scale": 0.3}``); ``global_topk`` (needs every tensor before
            the first) is not available here.
        calibration: a calibration setting (a preset, a ``"space:key=value"`` string, a dict or a
            :class:`~magic_pl.calibration.settings.CalibrationSetting`; default ``"wsc"``). Only its data-free part
            runs here: its weight steps, per key and row block, which must all be ``row_separable`` (``wsc``,
            ``scale``; ``svc`` and ``lines`` need the whole model); the feature step of ``fsc``/``dsc`` is
            :func:`streaming_fsc`'s, on the written model. A setting that detects its sensitive set needs it given
            (``sensitive``): the probe runs on data.
        sensitive: a given magnitude-sensitive set (names or a ranking JSON); default none.
        bn_stats: BatchNorm statistics policy of :func:`magic_pl.merging.merge` (default ``"average"``).
        seed: seed for randomised methods (DARE), per key as in :func:`magic_pl.merging.merge`.
        device: where the arithmetic runs: ``"auto"`` (default: CUDA when available), ``"cpu"``, ``"cuda"``, ...
        max_shard_size: output shard size (default ``"5GB"``, as ``transformers``).
        chunk_bytes: working-set bound per block of rows for row-separable methods (default ``"256MB"``).
        copy_support: copy the base directory's config / tokenizer / generation files (default ``True``).
        drop_page_cache: ask the kernel to drop read pages from the page cache (default ``False``).
        check_config: compare ``config.json`` architecture fields of base and experts when present (default
            ``True``).
        reader: ``"pread"`` (default, no memory map: resident memory stays at the tensors in use) or ``"mmap"``
            (``safe_open`` via :func:`~magic_pl.statedict.load_state_dict`; for comparison, see
            :func:`open_checkpoint`).
        progress: print one line per 10% of tensors (default ``False``).
        overwrite: replace an existing ``output`` that magic-pl did not write (default ``False``).
        method, method_options: deprecated spellings of ``merge_method``, ``merge_options``.

    Returns:
        A :class:`StreamReport`.
    """
    t0 = time.perf_counter()
    if method is not None or method_options is not None:
        warnings.warn("stream_merge(method=, method_options=) are deprecated; use merge_method=, merge_options=",
                      DeprecationWarning, stacklevel=2)
        merge_method = method if method is not None else merge_method
        merge_options = method_options if method_options is not None else merge_options
    request = merge_request(merge_method, merge_options, calibration, sensitive, caller="stream_merge")
    method, setting, opts = request.method, request.setting, request.options
    wsc = setting.uses_wsc
    wopts = setting.wsc_options()
    if not experts:
        raise CheckpointError("need at least one expert, got none")
    from magic_pl.output import OutputLocation

    out_loc = OutputLocation(output, overwrite=overwrite, inputs=[base, *experts]).check()
    dev = resolve_device(device)
    names = [f"expert {i} ({p})" for i, p in enumerate(experts)]
    if check_config:
        check_configs(base, experts, names)
    base_sd = open_checkpoint(base, drop_page_cache=drop_page_cache, reader=reader)
    expert_sds = [open_checkpoint(e, drop_page_cache=drop_page_cache, reader=reader) for e in experts]
    check_headers(base_sd, expert_sds, names)
    merger = KeyMerger(base_sd, expert_sds, request, bn_stats=bn_stats, seed=seed, device=dev,
                       chunk_bytes=chunk_bytes)
    report = StreamReport(output=str(output), method=method, method_options=opts, wsc=wsc, wsc_options=wopts,
                          device=str(dev))
    keys = list(base_sd.keys())
    plan = [(k, tuple(tensor_shape(base_sd, k)), tensor_dtype(base_sd, k)) for k in keys]
    with out_loc:
        tmp = out_loc.stage()
        writer = ShardedSafetensorsWriter(tmp, plan, max_shard_size=max_shard_size)
        try:
            for i, (key, shape, dtype) in enumerate(plan):
                if progress and len(plan) >= 10 and i % max(1, len(plan) // 10) == 0:
                    print(f"[stream_merge] {i}/{len(plan)} tensors, {time.perf_counter() - t0:.1f}s", flush=True)
                if not is_mergeable(dtype):
                    writer.write(key, base_sd[key].to(dtype))
                    report.copied += 1
                    continue
                stats = KeyMergeStats()
                for start, bc, taus, merged in merger.rows(key, shape, dtype, stats):
                    taus.clear()  # frees the task rows (the generator holds the same list) before the output
                    out = apply_delta(bc, merged, key=key, name=f"merged model {output}", out_dtype=dtype).cpu()
                    writer.write(key, out, row_offset=start or 0)
                    del bc, merged, out
                if wsc and stats.scale_sum:
                    report.wsc_mean_scale[key] = stats.scale_sum / stats.rows
                report.chunked += int(stats.chunked)
                report.calibrated += int(stats.changed)
                report.merged += 1
        except BaseException:
            writer.abort()
            raise
        writer.close()
        report.shards = [p.name for p in writer.shard_files]
        report.bytes_written = writer.total_size
        report.tensors = len(plan)
        if copy_support:
            src = Path(base) if Path(base).is_dir() else Path(base).parent
            copy_support_files(src, tmp)
        out_loc.commit({"content": "stream_merge", "method": method, "method_options": opts, "wsc": wsc,
                        "base": str(base), "experts": [str(e) for e in experts]})
    for sd in (base_sd, *expert_sds):
        if isinstance(sd, SafetensorsReader):
            sd.close()
    report.seconds = time.perf_counter() - t0
    return report


# --------------------------------------------------------------------------------------------------------------------
# FSC with lazily read base and experts
# --------------------------------------------------------------------------------------------------------------------
class AliasView(Mapping[str, Tensor]):
    """``source`` plus tied aliases resolved to their canonical key (``lm_head.weight`` -> ``embed_tokens.weight``):
    a checkpoint saved with tied weights stores one of them, while the in-memory model's state dict names both."""

    def __init__(self, source: StateDict, aliases: Mapping[str, str]):
        self.source = source
        self.aliases = {a: c for a, c in aliases.items() if a not in source and c in source}
        self._keys = list(source.keys()) + list(self.aliases)

    def __getitem__(self, key: str) -> Tensor:
        return self.source[self.aliases.get(key, key)]

    def shape(self, key: str) -> torch.Size:
        return tensor_shape(self.source, self.aliases.get(key, key))

    def dtype(self, key: str) -> torch.dtype:
        return tensor_dtype(self.source, self.aliases.get(key, key))

    def file_of(self, key: str) -> Optional[Path]:
        return tensor_file(self.source, self.aliases.get(key, key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self.aliases or key in self.source


def lazy_calibration_sources(
    base: PathLike,
    experts: Sequence[PathLike],
    *,
    tied: Optional[Mapping[str, str]] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> tuple[StateDict, list[LazyTaskVector]]:
    """``(base state, task vectors)`` read tensor by tensor from disk, for
    ``FeatureSpaceCalibrator(base_state, merged_model, task_vectors, ...)`` on a model too large to hold twice.

    Args:
        base, experts: checkpoints as in :func:`stream_merge`.
        tied: alias -> canonical key of the in-memory model (:func:`~magic_pl.models.base.find_tied_keys`), so
            aliases absent on disk resolve.
        device: where task-vector differences are computed (default: CPU).
    """
    base_sd = AliasView(open_checkpoint(base), tied or {})
    expert_sds = [AliasView(open_checkpoint(e), tied or {}) for e in experts]
    check_headers(base_sd, expert_sds, [f"expert {i} ({p})" for i, p in enumerate(experts)])
    return base_sd, [LazyTaskVector(e, base_sd, device=device, name=f"expert {i} ({p})", base_name=f"base ({base})")
                     for i, (e, p) in enumerate(zip(expert_sds, experts))]


def streaming_fsc(
    merged: nn.Module,
    base: PathLike,
    experts: Sequence[PathLike],
    batches: Any,
    *,
    calibration: Any = "fsc",
    sensitive: Optional[Union[str, PathLike, Collection[str]]] = None,
    modules: Optional[Sequence[str]] = None,
    task_names: Optional[Sequence[str]] = None,
) -> Any:
    """The feature step of a calibration setting on a merged model held in memory, reading base and expert tensors
    from disk one module at a time.

    Tied aliases (``lm_head`` under ``tie_word_embeddings``) are left out of the calibrated modules, so the shared
    weight is calibrated once by its canonical owner and the model stays an ordinary, foldable checkpoint.

    Args:
        merged: the merged (e.g. WSC-calibrated, from :func:`stream_merge`) model, calibrated in place.
        base, experts: the checkpoints it was merged from.
        batches: ``{task_index: iterable of batches}`` or ``(task_index, batch)`` pairs (see
            :func:`magic_pl.calibration.dsc.feed`); every task needs at least one.
        calibration: a setting with a feature step (``"fsc"`` default, ``"dsc"``: its WSC part is
            :func:`stream_merge`'s, ``"auto"`` with a given ``sensitive`` set, ...).
        sensitive: a given magnitude-sensitive set (names or a ranking JSON); default none.
        modules: explicit modules (default: the automatic units minus tied aliases).
        task_names: names of the tasks, for errors.

    Returns:
        The :class:`~magic_pl.calibration.CalibrationResult`.

    Raises:
        CalibrationDataError: (:mod:`magic_pl.calibration.fsc`, a ``ValueError``) a task has no batch, or its batches
            give non-finite features at some module; ``merged`` is then left as it was.
    """
    from magic_pl.calibration import resolve_setting
    from magic_pl.calibration.dsc import feed
    from magic_pl.calibration.modules import find_units

    setting = resolve_setting(calibration)
    if not setting.uses_data:
        raise ValueError(f"streaming_fsc: calibration {setting.to_string()!r} has no feature step (use stream_merge)")
    if setting.detects and sensitive is None:
        raise ValueError(f"streaming_fsc: calibration {setting.to_string()!r} would probe a second copy of the model; "
                         "give sensitive= (names or a ranking JSON of magic_pl.calibration.save_sensitivity)")
    tied = find_tied_keys(merged)
    base_sd, tvs = lazy_calibration_sources(base, experts, tied=tied)
    if modules is None and tied:
        modules = [u.name for u in find_units(merged) if not any(k in tied for k in u.keys)]
    calibrator = setting.feature_calibrator(base_sd, merged, tvs, setting.resolve_sensitive(sensitive),
                                            modules=modules, task_names=task_names)
    feed(calibrator, batches)
    return setting.result(calibrator.fold())
