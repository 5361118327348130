"""SVD-based merges of weight matrices: TSV-M, Iso-C and Iso-CTS.

Each works on one matrix at a time (2-D weights; 4-D conv weights viewed as ``[out, in * kh * kw]``); tensors that
are not matrices (biases, norms, embeddings matched by ``matrix_exclude``) are merged by the mean, as the reference
implementations do, and then scaled like the matrices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Optional

import torch
from torch import Tensor

from ._common import DEFAULT_MATRIX_EXCLUDE, as_matrix, check_fraction, polar, prepare, svd, tmean, tsum
from .method import merge_method
from .options import Fraction, Interval, MatrixExclude, Maybe, Scale

_ISO_PAPER = "Marczak et al., ICML 2025, arXiv 2502.04959"


def _support(mat: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the rows and columns of ``mat`` that hold a nonzero entry.

    All-zero rows and columns are the one *exact* rank deficiency the SVD methods detect: the matrix's rank is at most
    ``min(#nonzero rows, #nonzero columns)``, without any floating-point tolerance.
    """
    nz = mat != 0
    return nz.any(dim=1).nonzero().squeeze(1), nz.any(dim=0).nonzero().squeeze(1)


# --------------------------------------------------------------------------------------------------------------------
# TSV-M
# --------------------------------------------------------------------------------------------------------------------
def tsv_factors(mats: Sequence[Tensor], rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """TSV-M's factors: the top-``rank`` SVD of each matrix, concatenated, with U and V orthogonalised.

    Returns ``(U_perp [m, K*rank], S [K*rank], Vh_perp [K*rank, n])``; the merge is ``U_perp diag(S) Vh_perp``.
    ``U_perp`` is the polar factor ``P Q^T`` of ``[U_1 .. U_K] = P Sigma Q^T`` (likewise for V), the orthonormal
    matrix nearest to the concatenation; it has orthonormal columns whenever ``K * rank <= m``.
    """
    us, ss, vhs = [], [], []
    for m in mats:
        u, s, vh = svd(m)
        us.append(u[:, :rank])
        ss.append(s[:rank])
        vhs.append(vh[:rank])
    u_cat, s_cat, vh_cat = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)
    return polar(u_cat), s_cat, polar(vh_cat)


@merge_method(name="tsv_m", paper="Gargiulo et al., CVPR 2025, arXiv 2412.00081")
def tsv_m(
    taus: Sequence[Tensor],
    *,
    name: str = "",
    scale: Scale = 1.0,
    rank_fraction: Annotated[Optional[float], Maybe(Interval(0.0, 1.0, low_open=True))] = None,
    matrix_exclude: MatrixExclude = DEFAULT_MATRIX_EXCLUDE,
) -> Tensor:
    """TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025).

    Per matrix: keep each tau_k's top ``floor(rank_fraction * r)`` singular triplets (r = min(m, n); default
    fraction 1/K, the paper's choice, so the K blocks fill the full rank; at least 1), concatenate the U's, S's and
    V's, replace the concatenated U and V by their orthogonal polar factors, and rebuild
    ``U_perp diag(S) V_perp^T``. Other tensors: the mean. Result times ``scale`` (alpha = 1.0, the paper's default).

    Args:
        rank_fraction: fraction of the rank kept per task; ``None`` means 1/K.
        matrix_exclude: regex of 2-D parameter names merged by the mean instead (default: embedding tables and
            ``text_projection``, which the reference code also averages).
    """
    ts = prepare(taus, name)
    mats = [as_matrix(t, name, matrix_exclude) for t in ts]
    if mats[0] is None:
        return tmean(ts).mul_(float(scale))
    r = min(mats[0].shape)
    if rank_fraction is None:
        rank = r // len(ts)
    else:
        rank = int(check_fraction(rank_fraction, "rank_fraction", low_open=True) * r + 1e-9)
    rank = min(r, max(1, rank))
    u, s, vh = tsv_factors(mats, rank)
    return ((u * s) @ vh).reshape(ts[0].shape).mul_(float(scale))


# --------------------------------------------------------------------------------------------------------------------
# Iso-C and Iso-CTS
# --------------------------------------------------------------------------------------------------------------------
@merge_method(name="iso_c", paper=_ISO_PAPER)
def iso_c(
    taus: Sequence[Tensor],
    *,
    name: str = "",
    scale: Scale = 1.0,
    matrix_exclude: MatrixExclude = DEFAULT_MATRIX_EXCLUDE,
) -> Tensor:
    """Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces",
    ICML 2025): SVD of ``sum_k tau_k = U diag(S) V^T``, every singular value replaced by their mean:
    ``scale * mean(S) * U V^T``. Other tensors: the mean.

    All ``min(m, n)`` singular values are flattened, as in the reference (FusionBench 0.2.33's ``iso_c``): there is no
    numerical-rank cut-off, because a float32 sum of fine-tuning deltas has a long spectral tail that any tolerance
    (e.g. numpy's ``max(m, n) * eps * s_max``) would wrongly drop. The one exception is *exact* rank deficiency from
    all-zero rows or columns of the sum (e.g. a block no task changed): the SVD is taken of the nonzero rows and
    columns only, whose ``min(rows, cols)`` singular values are flattened, and the zero rows and columns stay zero
    (the reference would spread the mean over directions the sum does not have). ``scale`` is alpha = 1.0
    (FusionBench's default; the paper tunes alpha on validation data).
    """
    ts = prepare(taus, name)
    total = tsum(ts)
    mat = as_matrix(total, name, matrix_exclude)
    if mat is None:
        return total.div_(len(ts)).mul_(float(scale))
    rows, cols = _support(mat)
    if rows.numel() == 0:
        return torch.zeros_like(total)
    full = rows.numel() == mat.shape[0] and cols.numel() == mat.shape[1]
    sub = mat if full else mat[rows][:, cols]
    u, s, vh = svd(sub)
    flat = (u * s.mean()) @ vh
    if full:
        out = flat
    else:
        out = torch.zeros_like(mat)
        out[rows.unsqueeze(1), cols.unsqueeze(0)] = flat
    return out.reshape(total.shape).mul_(float(scale))


@merge_method(name="iso_cts", paper=_ISO_PAPER)
def iso_cts(
    taus: Sequence[Tensor],
    *,
    name: str = "",
    scale: Scale = 1.0,
    common_fraction: Fraction = 0.8,
    matrix_exclude: MatrixExclude = DEFAULT_MATRIX_EXCLUDE,
) -> Tensor:
    """Iso-CTS (Marczak et al., ICML 2025): isotropic merging in common and task-specific subspaces.

    Per matrix (r = min(m, n)): the common subspace is the top ``c`` singular triplets of ``sum_k tau_k`` with
    ``c ~ common_fraction * r`` (0.8, the paper's default), adjusted so the remaining ``r - c`` directions split
    evenly into ``s = (r - c) / K`` per task. Each task contributes the top ``s`` triplets of its residual
    ``tau_k - U_c U_c^T tau_k``. All U's and all V's are concatenated and orthogonalised (polar factor), and the
    spectrum is flattened to the mean of all concatenated singular values:
    ``scale * mean(S) * U_perp V_perp^T``. Other tensors: the mean. ``scale`` is alpha = 1.0 (FusionBench's default;
    the paper tunes alpha on validation data).
    """
    common_fraction = check_fraction(common_fraction, "common_fraction")
    ts = prepare(taus, name)
    mats = [as_matrix(t, name, matrix_exclude) for t in ts]
    if mats[0] is None:
        return tmean(ts).mul_(float(scale))
    k = len(ts)
    r = min(mats[0].shape)
    common = int(r * common_fraction + 1e-9)
    per_task = int(round((r - common) / k))
    common = r - per_task * k
    if common < 0:  # fewer directions than tasks would need: all common (reduces to Iso-C over the full rank)
        per_task, common = 0, r
    u, s, vh = svd(tsum(mats))
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    if per_task > 0:
        uc = us[0]
        for m in mats:
            resid = m - uc @ (uc.T @ m)
            ut, st, vht = svd(resid)
            us.append(ut[:, :per_task])
            ss.append(st[:per_task])
            vhs.append(vht[:per_task])
    u_cat, s_cat, vh_cat = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)
    out = (polar(u_cat) * s_cat.mean()) @ polar(vh_cat)
    return out.reshape(ts[0].shape).mul_(float(scale))
