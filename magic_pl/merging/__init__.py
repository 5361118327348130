"""Training-free merge methods in task-vector space, computed tensor by tensor (see docs/method.md).

Each method is one registered :class:`MergeMethod` (made by :func:`merge_method` from one function in its own module;
:func:`get_method` returns it): its options with their defaults and rules, its paper, and its traits. Per-tensor
functions ``fn(taus, *, name="", **options) -> Tensor`` take the K task-vector slices of one parameter and return
the merged slice in float32, scaling coefficient included. :func:`merge` applies one to whole task vectors key by key
(lazy safetensors inputs stream); :func:`merge_models` goes from base + expert checkpoints to a merged model.
:func:`regmean` (RegMean, RegMean++) is data-based: it takes a model and unlabelled batches per task, and merges
whole task vectors at once. The per-tensor functions themselves live in their modules
(``from magic_pl.merging.ties import ties``); :func:`get_method` or :func:`merge` reach them by name.

Every module of this package is imported on import (``_catalog``), so a new method file registers itself
(docs/contributing.md).

Example::

    from magic_pl.merging import merge, merge_models
    tau_m = merge("ties", [tau_a, tau_b, tau_c], density=0.2)
    state = merge_models("base.safetensors", ["a.safetensors", "b.safetensors"], "task_arithmetic", scale=0.3)
"""

from . import _catalog  # noqa: F401  (first: registers every method, in listing order)
from ._common import MergeError
from .method import DATA_MERGE_METHODS, MERGE_METHODS, METHODS, MergeMethod, get_method, merge_method
from .registry import merge, merge_models, merge_tensor, split_driver_args, validate_merge_options
from .regmean import regmean

__all__ = [
    "split_driver_args",
    "MergeMethod",
    "merge_method",
    "get_method",
    "METHODS",
    "MERGE_METHODS",
    "DATA_MERGE_METHODS",
    "merge",
    "merge_models",
    "merge_tensor",
    "validate_merge_options",
    "MergeError",
    "regmean",
]
