"""Repeated runs -> mean, standard deviation, and paired differences with a 95% interval.

A study repeats each cell with several seeds. A difference between two methods is
judged per seed (same seed = same split, teacher and student) and the interval is
Student's t over those paired differences: with 3 seeds an interval is wide, and a
claim is only as strong as the interval that excludes 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Hashable, Iterable, Optional


@dataclass(frozen=True)
class Spread:
    n: int
    mean: float
    std: Optional[float]  # sample standard deviation (n - 1); None for one value

    def text(self, digits: int) -> str:
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class Paired:
    n: int
    mean: float  # mean of a - b over the keys both have
    low: Optional[float]  # 95% interval of that mean; None with fewer than 2 pairs
    high: Optional[float]

    @property
    def verdict(self) -> str:
        """Which side is higher, only where the interval says so."""
        if self.low is None:
            return "one pair: no interval"
        if self.low > 0:
            return "a higher"
        if self.high < 0:
            return "b higher"
        return "not resolved (interval spans 0)"


def spread(values: Iterable[Optional[float]]) -> Optional[Spread]:
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return None
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return Spread(len(xs), mean, std)


def paired(
    a: Dict[Hashable, Optional[float]], b: Dict[Hashable, Optional[float]], level: float = 0.95
) -> Optional[Paired]:
    """a - b over the keys (seeds) where both have a value, with a two-sided t interval."""
    diffs = [a[k] - b[k] for k in a if k in b and a[k] is not None and b[k] is not None]
    if not diffs:
        return None
    s = spread(diffs)
    if s.std is None:
        return Paired(1, s.mean, None, None)
    from scipy.stats import t

    half = t.ppf(0.5 + level / 2, s.n - 1) * s.std / math.sqrt(s.n)
    return Paired(s.n, s.mean, s.mean - half, s.mean + half)
