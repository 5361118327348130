"""Training-free merge methods in task-vector space, computed tensor by tensor (see docs/method.md).

Per-tensor functions ``fn(taus, *, name="", **options) -> Tensor`` take the K task-vector slices of one parameter and
return the merged slice in float32, scaling coefficient included. :func:`merge` applies one to whole task vectors key
by key (lazy safetensors inputs stream); :func:`merge_models` goes from base + expert checkpoints to a merged model. :func:`regmean` (RegMean, RegMean++) is
data-based: it takes a model and unlabelled batches per task, and merges whole task vectors at once.

Example::

    from magic_pl.merging import merge, merge_models
    tau_m = merge("ties", [tau_a, tau_b, tau_c], density=0.2)
    state = merge_models("base.safetensors", ["a.safetensors", "b.safetensors"], "task_arithmetic", scale=0.3)
"""

from ._common import DEFAULT_MATRIX_EXCLUDE, MergeError
from .basic import task_arithmetic, weight_average
from .breadcrumbs import breadcrumbs, breadcrumbs_mask
from .consensus import consensus, tall_masks
from .dare import dare, dare_drop
from .della import della, magprune, magprune_keep_probabilities
from .model_stock import mean_pairwise_cosine, model_stock
from .regmean import DATA_MERGE_METHODS, regmean, regmean_blocks, regmean_memory, validate_data_merge_options
from .registry import (
    BN_STATS_POLICIES,
    MERGE_METHODS,
    MergeFn,
    merge,
    merge_models,
    merge_tensor,
    method_options,
    validate_merge_options,
)
from .slerp import slerp, slerp_rows
from .svd import iso_c, iso_cts, tsv_factors, tsv_m
from .ties import global_magnitude_thresholds, ties
from .wudi import wudi, wudi_matrix

__all__ = [
    "MergeFn",
    "MERGE_METHODS",
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
    "DATA_MERGE_METHODS",
    "validate_data_merge_options",
]
