"""ACE-Merging: a closed-form, RegMean-like merge whose input covariances are estimated from the task vectors' rows
(Xu et al., CVPR 2026, arXiv 2603.02945)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Annotated

import torch
from torch import Tensor

from ._common import check_fraction, prepare, tmean, tsum
from .method import merge_method
from .options import AtLeast, Fraction, Interval, MatrixExclude, Scale

#: 2-D parameters ACE averages instead of merging as a linear layer: the reference merges every other 2-D weight
#: (position and token embeddings included) and averages ``text_projection`` only.
ACE_MATRIX_EXCLUDE = r"text_projection"

#: The reference's guard added to every trace and squared norm before a log or a division.
_TINY = 1e-12


def heterogeneity(sq_norms: Tensor) -> float:
    """``gamma = Var(l) / (mean(l)^2 + 1e-12)`` with ``l_k = ln(||tau_k||_F^2 + 1e-12)`` (unbiased variance): how
    unequal the K task vectors' energies are. ``nan`` for K = 1, where the variance is undefined."""
    if sq_norms.numel() < 2:
        return math.nan
    logs = torch.log(sq_norms.to(torch.float64) + _TINY)
    return float(logs.var(correction=1) / (logs.mean() ** 2 + _TINY))


def ace_matrix(mats: Sequence[Tensor], *, eps: float = 1e-2, rank_fraction: float = 0.3,
               gamma_threshold: float = 0.3) -> Tensor:
    """ACE-Merging of K ``[out, in]`` matrices, in float64 (returned in float64). See :func:`ace` for the formula.

    float64 because the normal matrix is a sum of Gram matrices (condition number squared against the task vectors)
    whose small eigenvalues the solve must keep. The task loop accumulates ``[in, in]`` and ``[out, in]`` sums, so
    memory stays at a few matrices whatever K is (a ``[K, in, in]`` stack of covariances would be K times that); each
    step is one matrix product over all rows.
    """
    ws = [m.to(torch.float64) for m in mats]
    k = len(ws)
    n = ws[0].shape[1]
    sq_norms = torch.stack([torch.linalg.vector_norm(w) ** 2 for w in ws])
    # NaN (K = 1) compares False: a single task is not heterogeneous, as in the reference
    hetero = heterogeneity(sq_norms) > gamma_threshold

    sigma_sum = ws[0].new_zeros((n, n))       # sum_k Sigma_k (without the ridge)
    numer = torch.zeros_like(ws[0])           # sum_k X_k (Sigma_k + eps_k I)
    refine = torch.zeros_like(ws[0]) if hetero else None  # sum_k tau_k Sigma_k
    eps_sum = 0.0
    for w in ws:
        mu = w.mean(dim=0)
        x = w - mu                            # the rows of tau_k, centred: the samples of the covariance estimate
        sigma = x.T @ x
        if hetero:
            tr = float(sigma.trace()) + _TINY
            sigma.div_(tr)
            eps_k = eps / tr
        else:
            eps_k = eps
        xs = x @ sigma
        sigma_sum.add_(sigma)
        numer.add_(xs).add_(x, alpha=eps_k)
        eps_sum += eps_k
        if refine is not None:
            # tau_k Sigma_k = X_k Sigma_k + 1 (Sigma_k mu_k)^T: the uncentred product without a second [out, in] matmul
            refine.add_(xs).add_(sigma @ mu)

    # the collective structural prior: the column means of sum_k Sigma_k, added to every row of the normal matrix
    prior = sigma_sum.mean(dim=0)
    if hetero:
        prior.div_(float(sq_norms.mean()) + _TINY)
    normal = sigma_sum + prior
    normal.diagonal().add_(eps_sum)
    merged = torch.linalg.solve(normal, numer, left=False)  # numer @ normal^-1
    if refine is None:
        return merged

    # spectral refinement: the top directions of W0 + sum_k tau_k (Sigma_k - Sigma_bar), added with a flat spectrum
    sigma_bar = sigma_sum.div_(k)
    sigma_bar.diagonal().add_(eps_sum / k)
    fused = refine.add_(merged).sub_(tsum(ws) @ sigma_bar)
    u, s, vh = torch.linalg.svd(fused, full_matrices=False)
    top = int(s.numel() * rank_fraction)
    if top > 0:  # the reference takes the mean of no singular values (NaN) here; no direction adds nothing
        merged.add_((u[:, :top] * s[:top].mean()) @ vh[:top])
    return merged


@merge_method(name="ace", paper="Xu et al., CVPR 2026, arXiv 2603.02945")
def ace(
    taus: Sequence[Tensor],
    *,
    name: str = "",
    scale: Scale = 1.0,
    eps: Annotated[float, Interval(0.0, math.inf, low_open=True)] = 1e-2,
    rank_fraction: Fraction = 0.3,
    gamma_threshold: Annotated[float, AtLeast(0.0)] = 0.3,
    matrix_exclude: MatrixExclude = ACE_MATRIX_EXCLUDE,
) -> Tensor:
    """ACE-Merging (Xu et al., "ACE-Merging: Data-Free Model Merging with Adaptive Covariance Estimation", CVPR 2026).

    The paper's premise: the optimal merge of linear layers is ``(sum_k W_k Sigma_k)(sum_k Sigma_k)^-1`` (RegMean)
    with Sigma_k task k's input covariance, and the rows of a fine-tuning update are samples whose covariance
    estimates Sigma_k without data. Per 2-D weight, with tau_k ``[out, in]``, as the authors' code does it
    (``ace_merging``, the code the paper links; the paper's method section could not be consulted, so its equation
    numbers are not given here):

    1. Adaptive normalisation: ``l_k = ln(||tau_k||_F^2 + 1e-12)``, ``gamma = Var(l) / (mean(l)^2 + 1e-12)``
       (unbiased variance; :func:`heterogeneity`). The layer is *heterogeneous* when ``gamma > gamma_threshold``
       (0.3); never for K = 1.
    2. Covariances from the rows: ``X_k = tau_k - 1 mean_rows(tau_k)``, ``C_k = X_k^T X_k``. Heterogeneous:
       ``Sigma_k = C_k / t_k`` and ``eps_k = eps / t_k`` with ``t_k = tr(C_k) + 1e-12``; otherwise ``Sigma_k = C_k``,
       ``eps_k = eps`` (1e-2).
    3. Collective structural prior: ``c`` = the column means of ``sum_k Sigma_k`` (divided by ``mean_k
       ||tau_k||_F^2 + 1e-12`` when heterogeneous), added to every row:
       ``A = sum_k (Sigma_k + eps_k I) + 1 c^T``.
    4. Closed form: ``W0 = [sum_k X_k (Sigma_k + eps_k I)] A^-1`` (solved in float64, not inverted).
    5. Spectral refinement, heterogeneous layers only: ``D = W0 + sum_k tau_k (Sigma_k - Sigma_bar)`` with
       ``Sigma_bar = mean_k (Sigma_k + eps_k I)``; ``D = U diag(S) V^T``; with ``r = floor(rank_fraction *
       min(out, in))`` (0.3), ``W0 += mean(S_1..S_r) U_r V_r^T``.

    Result ``scale * W0`` (1.0, the reference's scaling coefficient). Defaults are the reference's (``eps = 1e-2``,
    ``k_frac = 0.3``, threshold 0.3, scaling coefficient 1.0). Other tensors (biases, norms, conv kernels, 2-D names
    matching ``matrix_exclude``) are averaged and scaled, as in the reference.

    Kept from the reference as it is, though a plain reading of the formula would differ: the numerator uses the
    row-centred ``X_k`` (so the homogeneous merge has zero column means) while the refinement uses the uncentred
    ``tau_k``; ``c`` is a row vector broadcast over rows, so ``A`` is not symmetric (it stays invertible: ``A =
    P + 1 c^T`` with ``P`` positive definite and ``c^T P^-1 1 >= 0``); ``Sigma_bar`` includes the ridge; in
    heterogeneous layers the prior is divided by the mean energy although the Sigma_k are already trace-normalised.
    Consequently ACE does not return a single expert unchanged, and K copies of one expert merge like that expert
    alone. Where ``rank_fraction * min(out, in) < 1`` the reference averages no singular values (NaN); here the
    refinement then adds nothing.

    Args:
        eps: the ridge on each covariance (> 0; relative to the trace in heterogeneous layers).
        rank_fraction: fraction of ``min(out, in)`` refined in heterogeneous layers (the reference's ``k_frac``).
        gamma_threshold: ``gamma`` above which a layer is heterogeneous.
        matrix_exclude: regex of 2-D parameter names averaged instead (default ``text_projection``, the reference's
            only exclusion; unlike the SVD methods, embedding tables are merged as matrices, as the reference does).
    """
    if not eps > 0.0:
        raise ValueError(f"ace: option eps={eps!r} must be > 0")
    rank_fraction = check_fraction(rank_fraction, "rank_fraction")
    ts = prepare(taus, name)
    t0 = ts[0]
    if t0.dim() != 2 or min(t0.shape) == 0 or (matrix_exclude and re.search(matrix_exclude, name)):
        return tmean(ts).mul_(float(scale))
    out = ace_matrix(ts, eps=float(eps), rank_fraction=rank_fraction, gamma_threshold=float(gamma_threshold))
    return out.to(torch.float32).mul_(float(scale))
