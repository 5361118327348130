"""Shared Hugging Face helpers: quiet loading, architecture checks between configs, and expert state dicts read
lazily from disk when the on-disk keys are the in-memory keys (else materialised through ``from_pretrained``, which
applies ``transformers``' key conversions)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from magic_pl.models.base import KeyView, PrefixView
from magic_pl.statedict import CheckpointError, StateDict, load_state_dict, shape_error, tensor_shape

PathLike = Union[str, os.PathLike]

#: Config fields that define the architecture: experts must agree with the base on each one they set.
ARCH_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "head_dim",
    "tie_word_embeddings",
    "image_size",
    "patch_size",
    "num_channels",
    "projection_dim",
)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> Union[torch.dtype, str, None]:
    """``"float32"``/``"bfloat16"``/``"float16"`` -> torch dtype; torch dtypes, ``"auto"`` (checkpoint dtype) and
    ``None`` pass."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'") from None


def dtype_kwargs(dtype: Union[str, torch.dtype, None]) -> dict[str, Any]:
    """``from_pretrained`` keyword for a dtype name: ``dtype=`` (transformers >= 4.56) or ``torch_dtype=`` (older);
    empty for ``None``."""
    value = resolve_dtype(dtype)
    if value is None:
        return {}
    import transformers
    from packaging.version import Version

    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: value}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence ``transformers``' load reports and progress bars inside the block (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _looks_like_hub_id(path: PathLike) -> bool:
    """``name`` or ``org/name`` (what the hub accepts), not a filesystem path."""
    text = str(path)
    return (not os.path.isabs(text) and not text.startswith((".", "~")) and text.count("/") <= 1
            and bool(text) and all(c.isalnum() or c in "-_./" for c in text) and ".." not in text)


def load_error(path: PathLike, label: str, err: Exception) -> CheckpointError:
    """The :class:`CheckpointError` for ``transformers`` failing to load ``label`` from ``path``: "... not found"
    when ``path`` is neither a local directory nor (reachable) on the hub, never the hub's repo-id syntax message."""
    if not Path(path).exists():
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return CheckpointError(f"{label}: {path} not found: no such local directory, and the Hugging Face hub "
                               f"lookup failed ({reason[:200]})")
    return CheckpointError(f"cannot load {label} from {path}: {err}")


def load_config(path: PathLike, **overrides: Any):
    """``AutoConfig.from_pretrained(path, **overrides)`` with a :class:`CheckpointError` naming the path on failure
    (``... not found`` for a missing directory)."""
    from transformers import AutoConfig

    if not Path(path).exists() and not _looks_like_hub_id(path):
        raise CheckpointError(f"Hugging Face model directory {path} not found")
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(str(path), **overrides)
    except Exception as err:
        raise load_error(path, "Hugging Face config", err) from err


def _config_value(config: Any, field: str) -> Any:
    value = getattr(config, field, None)
    if value is None and hasattr(config, "get_text_config"):
        try:
            value = getattr(config.get_text_config(), field, None)
        except Exception:
            value = None
    return value


def check_config(base: Any, expert: Any, name: str, fields: Sequence[str] = ARCH_FIELDS) -> None:
    """Raise :class:`CheckpointError` when ``expert``'s config disagrees with ``base``'s on an architecture field."""
    for field in fields:
        b, e = _config_value(base, field), _config_value(expert, field)
        if b is None or e is None or b == e:
            continue
        hint = ""
        if field == "vocab_size":
            hint = " (the vocabularies differ: experts must share the base's tokenizer and vocabulary size)"
        elif field == "tie_word_embeddings":
            hint = " (tied and untied input/output embeddings cannot be merged key for key)"
        raise CheckpointError(f"{name} has {field}={e!r} but the base has {field}={b!r}: different architectures{hint}")


def expert_body_state(
    path: PathLike,
    expected: Mapping[str, torch.Size],
    *,
    prefixes: Sequence[Union[str, tuple[str, str]]],
    name: str,
    materialize: Optional[Callable[[], Mapping[str, torch.Tensor]]] = None,
    optional: Sequence[str] = (),
    trust_pickle: bool = False,
    backend: str = "mmap",
) -> StateDict:
    """The expert's body tensors keyed like the in-memory body (``expected``: key -> shape).

    Tries each prefix (e.g. ``["bert.", ""]``; a pair ``(strip, add)`` also prepends ``add``, e.g.
    ``("", "vision_model.")``) on the on-disk keys: when every expected key is there, returns a lazy
    view (shapes checked; a mismatch raises :class:`CheckpointError` naming key and shapes). When keys are missing
    (``transformers`` renamed them on load, or an old format), ``materialize()`` loads the expert through
    ``from_pretrained`` and its state dict is used. Keys in ``optional`` may be absent (the caller fills them).
    ``trust_pickle``: read torch weight files with full pickle; ``backend``: how safetensors are read (both: see
    :func:`~magic_pl.statedict.load_state_dict`).
    """
    sd = load_state_dict(path, trust_pickle=trust_pickle, backend=backend)
    want = [k for k in expected if k not in optional]
    best: Optional[StateDict] = None
    for prefix in prefixes:
        strip, add = (prefix, "") if isinstance(prefix, str) else prefix
        view = PrefixView(sd, strip, add) if (strip or add) else sd
        if all(k in view for k in want):
            best = view
            break
    if best is not None:
        for k in want:
            got, exp = tuple(tensor_shape(best, k)), tuple(expected[k])
            if got != exp:
                raise shape_error(name, k, exp, got)
        return KeyView(best, [k for k in expected if k in best])
    if materialize is None:
        sample = [k for k in want if k not in sd][:5]
        raise CheckpointError(f"{name} ({path}) lacks body keys of the base, e.g. {sample}")
    state = dict(materialize())
    missing = [k for k in want if k not in state]
    if missing:
        raise CheckpointError(f"{name} ({path}) lacks body keys of the base, e.g. {missing[:5]}")
    for k in want:
        if tuple(state[k].shape) != tuple(expected[k]):
            raise shape_error(name, k, tuple(expected[k]), tuple(state[k].shape))
    return {k: state[k] for k in expected if k in state}


def from_pretrained_checked(cls: Any, path: PathLike, *, name: str, allow_missing: Sequence[str] = (),
                            **kwargs: Any) -> nn.Module:
    """``cls.from_pretrained(path, **kwargs)`` that fails (naming the keys) when weights were missing or mismatched,
    instead of silently initialising them at random. Missing keys starting with an entry of ``allow_missing`` are
    accepted (e.g. a fresh classifier head on a base encoder)."""
    if not Path(path).exists() and not _looks_like_hub_id(path):
        raise CheckpointError(f"{name}: Hugging Face model directory {path} not found")
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except Exception as err:
        raise load_error(path, f"{name} as {getattr(cls, '__name__', cls)}", err) from err
    missing = sorted(k for k in info.get("missing_keys", ()) if not any(k.startswith(a) for a in allow_missing))
    mismatched = sorted(info.get("mismatched_keys", ()), key=str)
    if missing or mismatched:
        raise CheckpointError(
            f"{name} ({path}) does not fit {type(model).__name__}: missing {missing[:5]}"
            + (f", shape-mismatched {mismatched[:5]}" if mismatched else "")
        )
    return model.eval()


def meta_from_config(auto_cls: Any, config: Any) -> nn.Module:
    """``auto_cls.from_config(config)`` built on the meta device (no memory, no init)."""
    with quiet_transformers(), torch.device("meta"):
        return auto_cls.from_config(config)


def has_meta(module: nn.Module) -> list[str]:
    """Names of tensors still on the meta device."""
    return [k for k, v in module.state_dict(keep_vars=True).items() if v is not None and v.device.type == "meta"]
