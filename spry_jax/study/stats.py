"""Means with 95 % confidence intervals over seeds, paired differences and claim verdicts.

Student's t with n - 1 degrees of freedom, written out so the package needs no scipy: the
two-sided 95 % quantile is tabulated for 1-30 degrees of freedom and, above, given by the
Cornish-Fisher expansion around the normal quantile (error < 3e-8 at 31 dof, smaller beyond).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# t_{0.975, dof} for dof = 1..30 (scipy.stats.t.ppf(0.975, dof), rounded to 6 decimals).
_T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
    2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
    2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
    2.048407, 2.045230, 2.042272,
)  # fmt: skip
_Z975 = 1.959963984540054

VERDICTS = ("reproduced", "not reproduced", "contradicted")


def t_quantile_975(dof: int) -> float:
    """The 0.975 quantile of Student's t with ``dof`` degrees of freedom (two-sided 95 %)."""
    if dof < 1:
        raise ValueError(f"dof must be >= 1, got {dof}")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z, n = _Z975, float(dof)
    return (
        z
        + (z**3 + z) / (4 * n)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * n**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * n**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * n**4)
    )


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95 % CI half-width ``t_{0.975, n-1} * sd / sqrt(n)`` (sd with n - 1).

    Returns:
      ``{"n", "mean", "sd", "half_width", "lo", "hi", "values"}``; with n < 2 the spread
      figures are None (one seed gives no interval); with n = 0 the mean is None too.
    """
    xs = [float(v) for v in values]
    n = len(xs)
    out: dict[str, Any] = {"n": n, "values": xs, "mean": None, "sd": None}
    out.update(half_width=None, lo=None, hi=None)
    if n == 0:
        return out
    mean = sum(xs) / n
    out["mean"] = mean
    if n < 2:
        return out
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    out.update(sd=sd, half_width=half, lo=mean - half, hi=mean + half)
    return out


def paired_difference(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """Mean over the seeds both have of ``a[seed] - b[seed]``, with its 95 % CI (:func:`mean_ci`).

    Pairing by seed removes what the seed does to both arms alike (data partition, client
    sampling, initialisation), so the interval is the one of the difference itself.
    """
    seeds = sorted(set(a) & set(b))
    out = mean_ci([a[s] - b[s] for s in seeds])
    out["seeds"] = seeds
    return out


def verdict(diff: dict[str, Any], op: str, margin: float = 0.0) -> str:
    """Whether a claim ``lhs - rhs op margin`` holds, from the CI of ``lhs - rhs``.

    reproduced: the whole 95 % CI is on the claimed side of ``margin``; contradicted: the whole
    CI is on the other side; otherwise (the CI contains ``margin``, or there is no CI because
    fewer than two seeds were run) not reproduced.
    """
    if op not in ("<", ">"):
        raise ValueError(f"a claim's op must be '<' or '>', got {op!r}")
    lo, hi = diff.get("lo"), diff.get("hi")
    if lo is None or hi is None:
        return "not reproduced"
    below, above = hi < margin, lo > margin
    if (op == "<" and below) or (op == ">" and above):
        return "reproduced"
    if (op == "<" and above) or (op == ">" and below):
        return "contradicted"
    return "not reproduced"
