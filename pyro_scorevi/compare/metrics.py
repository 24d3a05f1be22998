"""Figures of merit, in NumPy, for posterior predictive samples and fitted moments.

Classifiers take predictive class probabilities averaged over posterior samples; forecasters take
predictive draws. Every function returns a Python ``float``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "accuracy",
    "nll",
    "brier",
    "ece",
    "reliability",
    "mse",
    "mae",
    "crps",
    "coverage",
    "gaussian_kl",
    "moment_errors",
]

#: Bins of the expected calibration error, as in Guo et al. 2017 (and the issue).
ECE_BINS = 15

#: Probability floor in the NLL: keeps a confident mistake finite (log(1e-12) = -27.6 nats).
_PROB_FLOOR = 1e-12


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    """Fraction of ``argmax(probs) == y``; ``probs`` has shape ``(N, C)``."""
    return float(np.mean(np.argmax(probs, -1) == y))


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log predictive probability of the labels."""
    p = probs[np.arange(len(y)), y]
    return float(-np.mean(np.log(np.maximum(p, _PROB_FLOOR))))


def brier(probs: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score: mean over points of ``sum_c (p_c - 1[y = c])^2``."""
    onehot = np.eye(probs.shape[-1])[y]
    return float(np.mean(np.sum((probs - onehot) ** 2, -1)))


def reliability(
    probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (confidence, accuracy, count) over equal-width confidence bins on ``[0, 1]``.

    Empty bins have confidence and accuracy ``nan`` and count 0.
    """
    conf = probs.max(-1)
    correct = (np.argmax(probs, -1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Right-closed bins (conf in (lo, hi]); a confidence of exactly 0 cannot occur (max >= 1/C).
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, conf, minlength=bins) / count
        mean_acc = np.bincount(which, correct, minlength=bins) / count
    return mean_conf, mean_acc, count


def ece(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: ``sum_b (n_b / N) |acc_b - conf_b|`` over ``bins`` bins."""
    conf, acc, count = reliability(probs, y, bins)
    keep = count > 0
    return float(np.sum(count[keep] / count.sum() * np.abs(acc[keep] - conf[keep])))


def mse(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error of a point forecast."""
    return float(np.mean((pred - y) ** 2))


def mae(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean absolute error of a point forecast."""
    return float(np.mean(np.abs(pred - y)))


def crps(samples: np.ndarray, y: np.ndarray) -> float:
    """Continuous ranked probability score from predictive draws, averaged over points.

    ``samples`` has shape ``(K, N)``. Uses the energy form
    ``CRPS = E|X - y| - E|X - X'| / 2`` with the exact sorted-sample expression of
    ``E|X - X'|`` (an ``O(K log K)`` identity, no pairwise matrix).
    """
    k = samples.shape[0]
    term1 = np.mean(np.abs(samples - y[None]), 0)
    s = np.sort(samples, 0)
    # sum_{i,j} |x_i - x_j| = 2 sum_i (2i - K + 1) x_(i) for sorted x, i = 0..K-1.
    w = (2 * np.arange(k) - k + 1)[:, None]
    term2 = 2 * np.sum(w * s, 0) / (k * k)
    return float(np.mean(term1 - 0.5 * term2))


def coverage(samples: np.ndarray, y: np.ndarray, level: float = 0.9) -> float:
    """Fraction of ``y`` inside the central ``level`` predictive interval of ``samples``."""
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return float(np.mean((y >= lo) & (y <= hi)))


def gaussian_kl(loc: np.ndarray, scale: np.ndarray, mu: np.ndarray, precision: np.ndarray) -> float:
    """Exact ``KL(N(loc, diag scale^2) || N(mu, precision^-1))`` in nats."""
    d = len(mu)
    diff = loc - mu
    _, logdet_prec = np.linalg.slogdet(precision)
    return float(
        0.5
        * (
            np.sum(np.diag(precision) * scale**2)
            + diff @ precision @ diff
            - d
            - logdet_prec
            - 2 * np.sum(np.log(scale))
        )
    )


def moment_errors(
    loc: np.ndarray, scale: np.ndarray, ref_mean: np.ndarray, ref_sd: np.ndarray
) -> dict[str, float]:
    """Distance of fitted moments to reference ones.

    Returns:
        ``mean_z_rmse``: root mean square of ``(loc - ref_mean) / ref_sd`` (errors in reference
        posterior sds); ``log_sd_rmse``: root mean square of ``log(scale / ref_sd)``;
        ``log_sd_bias``: mean of ``log(scale / ref_sd)`` (negative: too narrow).
    """
    z = (loc - ref_mean) / ref_sd
    r = np.log(scale / ref_sd)
    return {
        "mean_z_rmse": float(np.sqrt(np.mean(z**2))),
        "log_sd_rmse": float(np.sqrt(np.mean(r**2))),
        "log_sd_bias": float(np.mean(r)),
    }
