"""WUDI merging: the merged matrix optimised against the task vectors' interference (Cheng et al., arXiv 2503.08099)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import Tensor

from ._common import DEFAULT_MATRIX_EXCLUDE, as_matrix, prepare, tmean
from .method import merge_method
from .options import Device, Integer, Interval, MatrixExclude, Scale

#: Most optimisation steps accepted (the reference uses 300-400 per matrix).
MAX_STEPS = 100_000


def wudi_matrix(mats: Sequence[Tensor], *, steps: int = 300, lr: float = 1e-5) -> Tensor:
    """Minimise ``L(X) = sum_k ||(X - T_k) T_k^T||_F^2 / ||T_k||_F^2`` from ``X = sum_k T_k`` with ``steps`` Adam
    steps (learning rate ``lr``, no weight decay), on the matrices' device, in float32.

    The gradient is exact and closed-form, ``2 (X G - C)`` with ``G = sum_k T_k^T T_k / ||T_k||^2`` and
    ``C = sum_k T_k T_k^T T_k / ||T_k||^2`` computed once, so a step costs one ``[m, n] @ [n, n]`` product instead of
    the 2K products autograd runs on the loss. A zero task matrix adds nothing to the loss (the reference divides 0
    by 0 there).
    """
    x0 = mats[0].new_zeros(mats[0].shape)
    n = mats[0].shape[1]
    gram = mats[0].new_zeros((n, n))
    target = mats[0].new_zeros(mats[0].shape)
    for t in mats:
        x0 += t
        sq = float(torch.linalg.vector_norm(t)) ** 2
        if sq == 0.0:
            continue
        g = t.T @ t
        gram += g / sq
        target += (t @ g) / sq
        del g
    x = torch.nn.Parameter(x0)
    opt = torch.optim.Adam([x], lr=lr, weight_decay=0)
    for _ in range(steps):
        with torch.no_grad():
            x.grad = (x @ gram).sub_(target).mul_(2.0)
        opt.step()
    return x.detach()


@merge_method(name="wudi", paper="Cheng et al., 2025, arXiv 2503.08099")
def wudi(
    taus: Sequence[Tensor],
    *,
    name: str = "",
    steps: Annotated[int, Integer(0, MAX_STEPS)] = 300,
    lr: Annotated[float, Interval(0.0, 1.0, low_open=True)] = 1e-5,
    scale: Scale = 1.0,
    matrix_exclude: MatrixExclude = DEFAULT_MATRIX_EXCLUDE,
    device: Annotated[str | None, Device()] = None,
) -> Tensor:
    """WUDI merging (Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging
    via Task Vectors", arXiv 2503.08099): per linear-layer matrix, ``tau_m = argmin_X sum_k ||(X - tau_k)
    tau_k^T||_F^2 / ||tau_k||_F^2`` by Adam from ``X = sum_k tau_k`` (:func:`wudi_matrix`); other tensors: the mean.
    Result times ``scale`` (1.0: the reference adds tau_m to the base unscaled).

    Defaults as FusionBench 0.2.33's ``wudi_merging`` (the reference): ``steps = 300``, ``lr = 1e-5`` (its shipped
    config runs 400 steps). Matrices are 2-D weights and conv weights viewed ``[out, -1]``; 2-D names matching
    ``matrix_exclude`` (embedding tables) are averaged, where the reference optimises every 2-D tensor not in its
    ``exclude_keys`` (an embedding table's ``[vocab, vocab]`` interference product is impractical).

    Args:
        device: where the optimisation runs (e.g. ``"cuda"``; default: the task vectors' device). The result comes
            back on the task vectors' device.
    """
    ts = prepare(taus, name)
    mats = [as_matrix(t, name, matrix_exclude) for t in ts]
    if mats[0] is None:
        return tmean(ts).mul_(float(scale))
    dev = torch.device(device) if device is not None else ts[0].device
    out = wudi_matrix([m.to(dev) for m in mats], steps=int(steps), lr=float(lr))
    return out.to(ts[0].device).reshape(ts[0].shape).mul_(float(scale))
