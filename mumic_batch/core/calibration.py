"""Per-class Platt scaling: p' = sigmoid(a_c * logit + b_c), fitted on the validation split's logits.

The fit is small and regularised: Platt's smoothed targets ((N+ + 1) / (N+ + 2) for positives,
1 / (N- + 2) for negatives) and an L2 pull of (a, b) towards the identity (1, 0), solved by Newton's
method (two parameters, a strictly convex loss). A class with too few validation positives or
negatives, or whose fit does not rank in the logit's direction (a <= 0), keeps the identity, and its
note says why. With a > 0 the scaling is monotone per class: per-class AP and ROC AUC are unchanged,
pooled metrics (GAP, ECE) are not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

L2 = 1.0  # pull towards the identity, in units of one validation pair's loss
_ITERATIONS = 50
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Platt:
    """One class's scaling and how it came about."""

    a: float  # slope on the logit (1: unchanged)
    b: float  # shift of the logit (0: unchanged)
    fitted: bool  # False: the identity was kept, see `note`
    note: str


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function in float64."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    e = np.exp(z[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def apply_platt(logits: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Calibrated probabilities [N, C] from logits [N, C] and per-class a, b [C]."""
    return sigmoid(np.asarray(logits, dtype=np.float64) * np.asarray(a)[None, :] + np.asarray(b)[None, :])


def fit_platt(y_true: np.ndarray, logits: np.ndarray, *, min_support: int = 10, l2: float = L2) -> list[Platt]:
    """One Platt per class (columns of y_true [N, C] and logits [N, C])."""
    y = np.asarray(y_true).astype(bool)
    z = np.asarray(logits, dtype=np.float64)
    return [fit_platt_class(y[:, j], z[:, j], min_support=min_support, l2=l2) for j in range(y.shape[1])]


def fit_platt_class(y: np.ndarray, z: np.ndarray, *, min_support: int = 10, l2: float = L2) -> Platt:
    """Platt scaling of one class; the identity when the class has fewer than `min_support` of either label."""
    y = np.asarray(y).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if min(pos, neg) < min_support:
        return Platt(1.0, 0.0, False, f"identity: {pos} positives, {neg} negatives (fewer than {min_support})")
    if not np.all(np.isfinite(z)):
        return Platt(1.0, 0.0, False, "identity: non-finite validation logits")
    t = np.where(y, (pos + 1.0) / (pos + 2.0), 1.0 / (neg + 2.0))
    a, b = _newton(np.asarray(z, dtype=np.float64), t, l2)
    if not a > 0:
        return Platt(1.0, 0.0, False, f"identity: the fit reverses the ranking (a={a:.3f})")
    return Platt(a, b, True, f"platt a={a:.3f} b={b:+.3f} on {pos} positives, {neg} negatives")


def _loss(z: np.ndarray, t: np.ndarray, a: float, b: float, l2: float) -> float:
    s = a * z + b
    # BCE with soft targets, written with logaddexp so that no probability under/overflows
    return float(np.sum(np.logaddexp(0.0, s) - t * s) + 0.5 * l2 * ((a - 1.0) ** 2 + b ** 2))


def _newton(z: np.ndarray, t: np.ndarray, l2: float) -> tuple[float, float]:
    """Minimise the regularised soft-target BCE over (a, b), starting at the identity, with backtracking."""
    a, b = 1.0, 0.0
    current = _loss(z, t, a, b, l2)
    for _ in range(_ITERATIONS):
        p = sigmoid(a * z + b)
        r, w = p - t, p * (1.0 - p)
        grad = np.array([np.dot(r, z) + l2 * (a - 1.0), r.sum() + l2 * b])
        hess = np.array([[np.dot(w, z * z) + l2, np.dot(w, z)], [np.dot(w, z), w.sum() + l2]])
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-10:
            na, nb = a - scale * step[0], b - scale * step[1]
            trial = _loss(z, t, na, nb, l2)
            if trial <= current:
                break
            scale /= 2.0
        else:
            break
        improvement = current - trial
        a, b, current = na, nb, trial
        if improvement < _TOLERANCE * max(1.0, abs(current)):
            break
    return float(a), float(b)
