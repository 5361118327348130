"""Training-free merge methods in task-vector space, computed tensor by tensor (see docs/method.md).

Each method is one registered :class:`MergeMethod` (made by :func:`merge_method` from one function in its own module;
:func:`get_method` returns it): its options with their defaults and rules, its paper, and its traits. Per-tensor
functions ``fn(taus, *, name="", **options) -> Tensor`` take the K task-vector slices of one parameter and return
the merged slice in float32, scaling coefficient included. :func:`merge` applies one to whole task vectors key by key
(lazy safetensors inputs stream); :func:`merge_models` goes from base + expert checkpoints to a merged model.
:func:`regmean` (RegMean, RegMean++) is data-based: it takes a model and unlabelled batches per task, and merges
whole task vectors at once.

Every module of this package is imported on import (``_catalog``), so a new method file registers itself
(docs/contributing.md).

Example::

    from magic_pl.merging import merge, merge_models
    tau_m = merge("ties", [tau_a, tau_b, tau_c], density=0.2)
    state = merge_models("base.safetensors", ["a.safetensors", "b.safetensors"], "task_arithmetic", scale=0.3)
"""

from . import _catalog  # noqa: F401  (first: registers every method, in listing order)
from ._common import DEFAULT_MATRIX_EXCLUDE, MergeError
from .basic import task_arithmetic, weight_average
from .breadcrumbs import breadcrumbs
from .consensus import consensus, tall_masks
from .dare import dare
from .della import della
from .method import DATA_MERGE_METHODS, MERGE_METHODS, METHODS, MergeMethod, get_method, merge_method
from .model_stock import mean_pairwise_cosine, model_stock
from .registry import (
    BN_STATS_POLICIES,
    MergeFn,
    merge,
    merge_models,
    merge_tensor,
    method_options,
    validate_merge_options,
)
from .regmean import regmean, regmean_blocks, regmean_memory
from .slerp import slerp, slerp_rows
from .steps import breadcrumbs_mask, dare_drop, magprune, magprune_keep_probabilities
from .svd import iso_c, iso_cts, tsv_factors, tsv_m
from .ties import global_magnitude_thresholds, ties
from .wudi import wudi, wudi_matrix

__all__ = [
    "MergeMethod",
    "merge_method",
    "get_method",
    "METHODS",
    "MERGE_METHODS",
    "DATA_MERGE_METHODS",
    "MergeFn",
    "BN_STATS_POLICIES",
    "DEFAULT_MATRIX_EXCLUDE",
    "merge",
    "merge_models",
    "merge_tensor",
    "method_options",
    "validate_merge_options",
    "MergeError",
    "weight_average",
    "task_arithmetic",
    "ties",
    "global_magnitude_thresholds",
    "dare",
    "dare_drop",
    "breadcrumbs",
    "breadcrumbs_mask",
    "consensus",
    "tall_masks",
    "tsv_m",
    "tsv_factors",
    "iso_c",
    "iso_cts",
    "slerp",
    "slerp_rows",
    "model_stock",
    "mean_pairwise_cosine",
    "della",
    "magprune",
    "magprune_keep_probabilities",
    "wudi",
    "wudi_matrix",
    "regmean",
    "regmean_blocks",
    "regmean_memory",
]
