"""The matrix section: a sweep's variants of the recipe around it."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, List

from pydantic import Field, model_validator

from .base import Section

DOTTED_KEY_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
SWEEP_FIXED = ("name", "output_dir", "tracking", "matrix")  # shared by every variant of a sweep


def _check_dotted_keys(where: str, mapping: Dict[str, Any]) -> None:
    for key in mapping:
        if not re.fullmatch(DOTTED_KEY_PATTERN, str(key)):
            raise ValueError(f"{where}: {key!r} is not a dotted recipe key like prune.sparsity")
        if str(key).split(".")[0] in SWEEP_FIXED:
            raise ValueError(
                f"{where}: {key!r} cannot vary in a sweep (name, output_dir, tracking are shared: "
                "variants are named <name>-<suffix>, share one cache and one MLflow experiment)"
            )


MAX_VARIANTS = 10_000  # a sweep runs its variants one after the other: more is a typo, not a study


class MatrixRule(Section):
    when: Dict[str, Any] = Field(
        ...,
        min_length=1,
        description="Axis values a variant must have for `set` to apply, e.g. {prune.method: weight}.",
    )
    set: Dict[str, Any] = Field(
        ..., min_length=1, description="Dotted overrides applied to the matching variants, e.g. {prune.sparsity: 0.8}."
    )


class MatrixConfig(Section):
    """A sweep: variants of the recipe around it, run by `python -m toolchain sweep`."""

    axes: Dict[str, List[Any]] = Field(
        default_factory=dict,
        description="Dotted recipe key -> values; the variants are the product of all axes, "
        "e.g. {student.model: [resnet18, mobilenet_v2], prune.method: [weight, channel]}. Axis values name the variants.",
    )
    rules: List[MatrixRule] = Field(
        default_factory=list,
        description="Settings that depend on axis values, applied in order, later rules win: "
        "e.g. when {prune.method: weight} set {prune.sparsity: 0.8}; when {prune.method: channel} set {prune.sparsity: 0.5}.",
    )
    exclude: List[Dict[str, Any]] = Field(
        default_factory=list,
        description="Drop the variants whose axis values match every pair of an entry, e.g. {student.model: densenet121, prune.method: weight}.",
    )
    include: List[Dict[str, Any]] = Field(
        default_factory=list,
        description="Extra variants beyond the product, each a mapping of dotted overrides (rules apply to them too).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> "MatrixConfig":
        if not self.axes and not self.include:
            raise ValueError("a matrix needs axes or include entries")
        product = math.prod(len(v) for v in self.axes.values()) if self.axes else 0
        if product + len(self.include) > MAX_VARIANTS:  # counted before anything is expanded (memory)
            raise ValueError(
                f"the axes expand to {product:,} variants (product of their lengths), more than "
                f"{MAX_VARIANTS:,}; split the sweep into several recipes or use fewer axis values"
            )
        _check_dotted_keys("axes", self.axes)
        for key, values in self.axes.items():
            texts = [json.dumps(v, sort_keys=True, default=str) for v in values]
            if not values or len(set(texts)) != len(texts):
                raise ValueError(f"axes.{key}: give a non-empty list of distinct values")
        known = set(self.axes).union(*[set(entry) for entry in self.include])
        for i, rule in enumerate(self.rules):
            _check_dotted_keys(f"rules[{i}].set", rule.set)
            if not set(rule.when) <= known:
                raise ValueError(
                    f"rules[{i}].when: {sorted(set(rule.when) - known)} not an axis or include key; match on those"
                )
        for i, entry in enumerate(self.exclude):
            if not entry or not set(entry) <= set(self.axes):
                raise ValueError(f"exclude[{i}]: give axis keys only (axes: {', '.join(self.axes) or 'none'})")
        for i, entry in enumerate(self.include):
            if not entry:
                raise ValueError(f"include[{i}]: an empty variant; give dotted overrides")
            _check_dotted_keys(f"include[{i}]", entry)
        return self
