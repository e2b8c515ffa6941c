"""The recipe: YAML -> typed, validated configuration.

This package is the single place where user input is validated. Every model has
extra="forbid" (a typo is an error, not a silently ignored key) and every field a
description (shown by `python -m toolchain validate`). Downstream code trusts it.

The package's face: what the rest of the toolchain imports. The code is in
    base.py        Section, the base of every section
    names.py       registry-name checks used by the validators (registries imported when a value is checked)
    inputs.py      data, teacher, student (ModelConfig)
    training.py    distill / finetune / teacher.train (TrainConfig, DKD, feature terms)
    pruning.py     prune and its budget
    deployment.py  export, latency (the paired comparison), bench, quantize (+ auto), package
    matrix.py      the sweep's matrix
    schema.py      Recipe: run name, seed, device, output, tracking, one field per section
    loading.py     YAML read (alias-expansion guard), dotted overrides, load_recipe, validate_dict, first error
    dumping.py     to_yaml, shown, recipe_hash
It imports nothing from the engine, the stages or the commands. A test that patches a helper patches
it in the submodule that calls it (a name here is a copy).
"""

from ..errors import RecipeError
from ..formatting import stable_hash as stable_hash  # tests: the hash recipe_hash applies
from .base import Section
from .deployment import (
    MAX_BENCH_BATCH,
    AutoQuantizeConfig,
    BenchConfig,
    ExportConfig,
    LatencyConfig,
    PackageConfig,
    QuantizeConfig,
)
from .dumping import recipe_hash, shown, to_yaml
from .inputs import DataConfig, ModelConfig, StudentConfig, TeacherConfig
from .loading import MAX_EXPANDED_VALUES, load_recipe, set_dotted, validate_dict
from .loading import _apply_override as _apply_override  # sweep: a variant's dotted overrides
from .loading import _read_yaml as _read_yaml  # sweep: the recipe file before its matrix is expanded
from .matrix import DOTTED_KEY_PATTERN, MAX_VARIANTS, SWEEP_FIXED, MatrixConfig, MatrixRule
from .pruning import BUDGET_KINDS, LATENCY_BUDGETS, PruneBudget, PruneConfig
from .schema import RUN_NAME_PATTERN, Recipe, TrackingConfig
from .training import DKDConfig, FeatureConfig, TrainConfig

__all__ = [
    "AutoQuantizeConfig",
    "BUDGET_KINDS",
    "BenchConfig",
    "DKDConfig",
    "DOTTED_KEY_PATTERN",
    "DataConfig",
    "ExportConfig",
    "FeatureConfig",
    "LATENCY_BUDGETS",
    "LatencyConfig",
    "MAX_BENCH_BATCH",
    "MAX_EXPANDED_VALUES",
    "MAX_VARIANTS",
    "MatrixConfig",
    "MatrixRule",
    "ModelConfig",
    "PackageConfig",
    "PruneBudget",
    "PruneConfig",
    "QuantizeConfig",
    "RUN_NAME_PATTERN",
    "Recipe",
    "RecipeError",
    "SWEEP_FIXED",
    "Section",
    "StudentConfig",
    "TeacherConfig",
    "TrackingConfig",
    "TrainConfig",
    "load_recipe",
    "recipe_hash",
    "set_dotted",
    "shown",
    "to_yaml",
    "validate_dict",
]
