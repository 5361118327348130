"""SVC: an independent per-direction recomputation, closed forms for orthogonal tasks, key selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from magic_pl.calibration.svc import DEFAULT_SVC_ALPHA, singular_value_calibration, svc_matrix


def _reference_svc(merged: np.ndarray, tasks: list[np.ndarray], alpha: float) -> np.ndarray:
    """Loop form of the paper's rule (one direction and one task at a time), float64."""
    u, s, vh = np.linalg.svd(merged, full_matrices=False)
    gammas = []
    for r in range(len(s)):
        a_m = u[:, r] @ merged
        coefs = []
        for t in tasks:
            a_i = u[:, r] @ t
            coefs.append(max(alpha, float(a_m @ a_i) / float(a_i @ a_i)))
        gammas.append(len(tasks) / sum(coefs))
    return u @ np.diag(np.array(gammas) * s) @ vh


def test_matches_the_loop_form_of_the_rule():
    g = torch.Generator().manual_seed(0)
    common = torch.randn(12, 9, generator=g, dtype=torch.float64)
    tasks = [common + torch.randn(12, 9, generator=g, dtype=torch.float64) for _ in range(4)]
    merged = 0.3 * sum(tasks)
    for alpha in (0.1, 0.5, 1.0):
        ref = _reference_svc(merged.numpy(), [t.numpy() for t in tasks], alpha)
        np.testing.assert_allclose(svc_matrix(merged, tasks, alpha=alpha).numpy(), ref, rtol=1e-10, atol=1e-12)


def test_task_arithmetic_of_orthogonal_tasks_is_divided_by_its_over_count():
    # Rank-1 tasks q_k w_k^T with orthonormal q's and w's (distinct norms): u_r = q_k, along which one task responds
    # with s_ri = lambda (TA with coefficient lambda sums it once), the others with 0 -> alpha.
    # gamma = K / (lambda + (K - 1) alpha).
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64, generator=g))
    w, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=g))
    tasks = [torch.outer(q[:, k], w[:, k]) * (k + 1) for k in range(3)]
    lam, alpha = 0.5, 0.1
    out = svc_matrix(lam * sum(tasks), tasks, alpha=alpha)
    gamma = 3 / (lam + 2 * alpha)
    torch.testing.assert_close(out, gamma * lam * sum(tasks), rtol=1e-10, atol=1e-12)
    # K identical tasks under TA (s = K lambda each): gamma = 1 / (K lambda), the merge shrinks back to one task.
    t = tasks[0] + tasks[1]
    torch.testing.assert_close(svc_matrix(0.3 * 3 * t, [t, t, t], alpha=alpha), t, rtol=1e-10, atol=1e-12)


def test_mapping_selection_dtype_and_conv_view():
    g = torch.Generator().manual_seed(2)
    tvs = [{"fc.weight": torch.randn(6, 4, generator=g), "fc.bias": torch.randn(6, generator=g),
            "conv.weight": torch.randn(5, 2, 3, 3, generator=g), "pos_embed": torch.randn(7, 4, generator=g)}
           for _ in range(3)]
    merged = {k: (0.3 * sum(tv[k] for tv in tvs)).to(torch.bfloat16 if k == "fc.weight" else torch.float32)
              for k in tvs[0]}
    out = singular_value_calibration(merged, tvs)
    assert out.keys() == merged.keys()
    assert out["fc.bias"] is merged["fc.bias"] and out["pos_embed"] is merged["pos_embed"]  # 1-D / excluded
    assert out["fc.weight"].dtype == torch.bfloat16
    ref = svc_matrix(merged["fc.weight"].float(), [tv["fc.weight"] for tv in tvs], alpha=DEFAULT_SVC_ALPHA)
    torch.testing.assert_close(out["fc.weight"], ref.to(torch.bfloat16))
    conv = svc_matrix(merged["conv.weight"].reshape(5, -1), [tv["conv.weight"].reshape(5, -1) for tv in tvs])
    torch.testing.assert_close(out["conv.weight"], conv.reshape(5, 2, 3, 3))
    assert not torch.equal(out["conv.weight"], merged["conv.weight"])
    out2 = singular_value_calibration(merged, tvs, exclude=(), include=r"pos_embed")
    assert out2["conv.weight"] is merged["conv.weight"] and not torch.equal(out2["pos_embed"], merged["pos_embed"])


def test_zero_task_responses_count_as_alpha_and_errors():
    merged = torch.randn(4, 3, dtype=torch.float64)
    zero = torch.zeros(4, 3, dtype=torch.float64)
    # One zero task: its coefficient is 0 -> alpha; with the merge itself as the other task (s = 1):
    # gamma = 2 / (1 + alpha).
    torch.testing.assert_close(svc_matrix(merged, [merged, zero], alpha=0.2), merged * 2 / 1.2)
    with pytest.raises(ValueError, match="alpha=0"):
        singular_value_calibration({"w": merged}, [{"w": merged}], alpha=0)
    with pytest.raises(KeyError, match="lacks key 'w'"):
        singular_value_calibration({"w": merged}, [{"v": merged}])
    with pytest.raises(ValueError, match="task vector 0 holds NaN/Inf in 'w'"):
        singular_value_calibration({"w": merged}, [{"w": merged * float("nan")}])
    with pytest.raises(ValueError, match="'w'"):
        singular_value_calibration({"w": merged * float("inf")}, [{"w": merged}])
