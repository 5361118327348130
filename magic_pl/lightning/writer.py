"""Saving a calibrated module atomically: ``save_pretrained`` for Hugging Face models, safetensors otherwise.

The output is always a directory written under a temporary name and renamed into place
(:func:`magic_pl.statedict.atomic_path`), so an interrupted run leaves no partial model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

from torch import nn

from magic_pl.output import check_task_names, child_path
from magic_pl.statedict import atomic_path, save_state_dict, validate_state_dict

__all__ = ["save_module", "is_hf_model"]


def is_hf_model(module: nn.Module) -> bool:
    """True for a ``transformers.PreTrainedModel`` (anything with ``save_pretrained`` and a ``config``)."""
    return callable(getattr(module, "save_pretrained", None)) and hasattr(module, "config")


def save_module(
    module: nn.Module,
    path: Union[str, os.PathLike],
    *,
    heads: Optional[Mapping[str, nn.Module]] = None,
    filename: str = "model.safetensors",
    metadata: Optional[Mapping[str, str]] = None,
    overwrite: bool = False,
    support_from: Optional[Union[str, os.PathLike]] = None,
) -> Path:
    """Write ``module`` (and optional per-task ``heads``) into the directory ``path``, atomically.

    Hugging Face models go through ``save_pretrained`` (safetensors, ``config.json``, loadable with
    ``from_pretrained``); other modules become ``path/<filename>`` (safetensors of ``state_dict()``), heads
    ``path/heads/<task>.safetensors``. An existing ``path`` is replaced only when it is empty, a previous magic-pl
    output or ``overwrite``, and only once the new one is complete. ``support_from``: a model directory whose
    tokenizer / processor / config side files are copied in (:func:`magic_pl.models.io.copy_support_files`), so the
    output loads with its tokenizer.
    """
    path = Path(path)
    names = check_task_names(list(heads or {}))  # before anything is written
    validate_state_dict(module.state_dict(), name=f"the model to write to {path}")  # no NaN/Inf is ever written
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True)
        if is_hf_model(module):
            module.save_pretrained(tmp, safe_serialization=True)
        else:
            state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
            save_state_dict(state, tmp / filename, metadata=metadata)
        if support_from is not None:
            from magic_pl.models.io import copy_support_files

            copy_support_files(support_from, tmp)
        if heads:
            (tmp / "heads").mkdir()
            for task, head in zip(names, heads.values()):
                save_state_dict({k: v.detach().cpu() for k, v in head.state_dict().items()},
                                child_path(tmp, "heads", f"{task}.safetensors"))
            (tmp / "heads" / "tasks.json").write_text(json.dumps(names, indent=2) + "\n")
    return path
