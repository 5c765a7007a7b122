"""Contribution and collaborative-fairness metrics (spec §3).

Notation: ``s`` = standalone test accuracies (the contribution measure, §3.1), ``theta`` = test
accuracies of the clients' reward models at a round (§3.3, §4.10); both length K, fractions in
[0, 1], client index order. All arithmetic is float64.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence

import torch

__all__ = [
    "contribution_weights",
    "fairness",
    "bcf_rate",
    "accuracy_stats",
    "round_metrics",
    "summarise",
    "mean_std",
]


def _vec(v, name: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float64).detach().cpu().reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{name}: empty")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return t


def _pair(s, theta):
    s, theta = _vec(s, "s"), _vec(theta, "theta")
    if s.numel() != theta.numel():
        raise ValueError(f"theta: {theta.numel()} values for {s.numel()} clients")
    return s, theta


def contribution_weights(s, beta: float) -> torch.Tensor:
    """``c_k = 100 * exp(beta * s_k) / max_j exp(beta * s_j)`` (spec §3.2), float64 ``[K]``.

    Computed as ``100 * exp(z_k - max_j z_j)`` with ``z = beta * s``, which never overflows (any
    sign of beta); the best client gets exactly 100.
    """
    s = _vec(s, "s")
    beta = float(beta)
    if not math.isfinite(beta):
        raise ValueError("beta: must be finite")
    z = beta * s
    return 100.0 * torch.exp(z - z.max())


def fairness(s, theta) -> float:
    """``gamma = 100 * Pearson(s, theta)`` (spec §3.3), in [-100, 100].

    Returns NaN when either vector is constant (Pearson's correlation is undefined: zero
    variance), e.g. when every client receives the same reward model, or when K < 2.
    """
    s, theta = _pair(s, theta)
    if s.numel() < 2:
        return math.nan
    # Test constancy exactly: the centred sums below can round to a tiny non-zero value.
    if bool(s.max() == s.min()) or bool(theta.max() == theta.min()):
        return math.nan
    ds, dt = s - s.mean(), theta - theta.mean()
    ss, st = float((ds * ds).sum()), float((dt * dt).sum())
    if ss == 0.0 or st == 0.0:
        return math.nan
    r = float((ds * dt).sum()) / math.sqrt(ss * st)
    return 100.0 * max(-1.0, min(1.0, r))


def bcf_rate(s, theta, alpha: float = 0.5) -> dict:
    """alpha-BCF membership (spec §3.5): the FedRAC logger's rate plus the separate counts.

    Client k is inside the bound iff ``s_k < theta_k <= upper_k`` with
    ``upper_k = ((1 - alpha) * s_k / max(s) + alpha) * max(theta)``. The logger's ``rate``
    walks the clients in index order: ``+1`` for a client inside the bound, a *reset* to ``-10``
    (not a decrement) for a violation ``theta_k <= s_k`` (later clients may still add +1), no
    change above the bound; the result is divided by K.

    Returns ``{"rate": float, "in_bound_fraction": float, "violations": int,
    "in_bound": list[bool], "upper_bounds": list[float]}`` (``violations`` =
    ``#{k : theta_k <= s_k}``).
    """
    s, theta = _pair(s, theta)
    alpha = float(alpha)
    max_s, max_t = float(s.max()), float(theta.max())
    if max_s <= 0:
        raise ValueError("s: max(s) must be > 0 (it divides the upper bound)")
    K = s.numel()
    rate, inside, violations, upper = 0, [], 0, []
    for k in range(K):
        sk, tk = float(s[k]), float(theta[k])
        up = ((1 - alpha) * sk / max_s + alpha) * max_t
        upper.append(up)
        ok = sk < tk and tk <= up
        inside.append(ok)
        if ok:
            rate += 1
        elif tk <= sk:
            rate = -10
            violations += 1
    return {"rate": rate / K, "in_bound_fraction": sum(inside) / K, "violations": violations,
            "in_bound": inside, "upper_bounds": upper}


def accuracy_stats(theta) -> dict:
    """``{"max_acc", "mean_acc", "min_acc"}`` over clients (spec §3.4)."""
    t = _vec(theta, "theta")
    return {"max_acc": float(t.max()), "mean_acc": float(t.mean()), "min_acc": float(t.min())}


def round_metrics(s, theta, alpha: float = 0.5) -> dict:
    """Every per-round metric of spec §3 in one flat dict: ``fairness``, ``max_acc``,
    ``mean_acc``, ``min_acc``, ``rate``, ``in_bound_fraction``, ``violations``."""
    b = bcf_rate(s, theta, alpha)
    out = {"fairness": fairness(s, theta)}
    out.update(accuracy_stats(theta))
    out.update({k: b[k] for k in ("rate", "in_bound_fraction", "violations")})
    return out


# metrics where smaller is better when picking the best round
MINIMISE = frozenset({"violations", "loss", "test_loss", "valid_loss", "train_loss"})


def summarise(history: Sequence[Mapping], keys: Optional[Iterable[str]] = None, *,
              minimise: Iterable[str] = MINIMISE, round_key: str = "round") -> dict:
    """Best and last values over rounds (spec §3.6: last round primary, best secondary).

    ``history``: one mapping per logged round (e.g. :func:`round_metrics` plus ``"round"``).
    ``keys``: metrics to summarise (default: every numeric key except ``round_key``).
    Returns ``{key: {"last", "last_round", "best", "best_round"}}``. ``best`` is the maximum over
    rounds (minimum for keys in ``minimise``), NaN values ignored, earliest round on ties;
    all-NaN gives NaN and ``best_round`` None. Rounds without ``round_key`` are numbered by
    position (1-based).
    """
    history = list(history)
    if not history:
        raise ValueError("history: no rounds")
    if keys is None:
        keys = []
        for h in history:
            for k, v in h.items():
                if k != round_key and k not in keys and isinstance(v, (int, float)) \
                        and not isinstance(v, bool):
                    keys.append(k)
    minimise = set(minimise)
    out = {}
    for key in keys:
        best, best_round, last, last_round = math.nan, None, math.nan, None
        for i, h in enumerate(history):
            if key not in h:
                continue
            v = float(h[key])
            r = h.get(round_key, i + 1)
            last, last_round = v, r
            if math.isnan(v):
                continue
            better = (v < best) if key in minimise else (v > best)
            if best_round is None or better:
                best, best_round = v, r
        out[key] = {"last": last, "last_round": last_round, "best": best, "best_round": best_round}
    return out


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) over repetitions (spec §1.4); NaN values are
    dropped; the std is NaN with fewer than two values."""
    v = [float(x) for x in values if not math.isnan(float(x))]
    if not v:
        return math.nan, math.nan
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, math.nan
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
