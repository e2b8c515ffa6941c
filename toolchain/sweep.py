"""Sweeps: a recipe with a `matrix:` section (or a directory of recipes) -> many compress runs.

    python -m toolchain sweep recipes/study/fmnist.yaml
    python -m toolchain sweep recipes/study/            # every recipe in the folder

A variant is the base recipe (without `matrix`) plus dotted overrides: one value per
axis, then the `rules` whose `when` matches, then the command line's overrides. It is
named <base-name>-<axis values> and validated by the same schema as any recipe; every
variant of every recipe is validated before the first one runs, so a typo fails the
sweep in a second, not after an hour of training.

Variants run one after the other in this process and log to the base recipe's MLflow
experiment. They share finished stages through the content-keyed stage cache: the
teacher is trained once, a student is distilled once for all its pruning variants.
A failed variant is reported and the sweep goes on; the exit code says if any failed.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import json
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from .errors import RecipeError, ToolchainError
from .recipe import Recipe, _apply_override, _read_yaml, set_dotted, validate_dict

RECIPE_SUFFIXES = (".yaml", ".yml")


class SweepError(ToolchainError):
    """Some variants of a sweep failed (each was reported when it failed)."""

    exit_code = 1


@dataclass
class Variant:
    name: str
    source: str
    coords: Dict[str, Any]  # the axis (or include) values that define the variant and its name
    overrides: Dict[str, Any]  # everything applied to the base: coords, matching rules, CLI overrides
    recipe: Recipe


@dataclass
class Outcome:
    variant: Variant
    status: str  # FINISHED, FAILED, or KILLED (the variant a Ctrl-C stopped)
    seconds: float
    error: str = ""
    summary: Dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- expansion


def recipe_files(path: str | Path) -> List[Path]:
    """A recipe file, or the recipes (*.yaml, *.yml) of a directory in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in RECIPE_SUFFIXES)
        if not files:
            raise RecipeError(f"{path}: no *.yaml recipes in this directory")
        return files
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file or directory")
    return [path]


def expand(path: str | Path, overrides: Sequence[str] = ()) -> List[Variant]:
    """All variants of a recipe file or directory, validated; names unique across them."""
    variants = [v for f in recipe_files(path) for v in expand_file(f, overrides)]
    seen: Dict[str, str] = {}
    for v in variants:
        if v.name in seen:
            raise RecipeError(
                f"{v.source}: variant name {v.name!r} also comes from {seen[v.name]}; "
                "two variants would overwrite each other's export/<name>/ (rename a recipe or change the axes)"
            )
        seen[v.name] = v.source
    return variants


def expand_file(path: Path, overrides: Sequence[str] = ()) -> List[Variant]:
    from .models.refs import add_import_root

    raw = _read_yaml(path)
    add_import_root(path.parent)  # as load_recipe does for compress: model: package.module:callable next to the recipe
    base = validate_dict(raw, source=str(path))  # the base, matrix section included, through the schema
    if base.matrix is None:
        for item in overrides:
            _apply_override(raw, str(item), path)
        return [
            Variant(base.name, str(path), {}, _parse_overrides(overrides, path), validate_dict(raw, source=str(path)))
        ]
    cli = _parse_overrides(overrides, path)
    clash = sorted(set(cli) & set(base.matrix.axes))
    if clash:
        raise RecipeError(
            f"{path}: override {clash[0]} is a matrix axis; edit matrix.axes in the recipe (or pick variants with --only)"
        )
    body = {k: v for k, v in raw.items() if k != "matrix"}
    variants = []
    chosen = points(base.matrix)
    if not chosen:
        raise RecipeError(
            f"{path}: the matrix leaves no variant (its exclude entries remove every combination of the "
            "axes); remove an exclude entry or add include entries"
        )
    for coords in chosen:
        settings = dict(coords)
        for rule in base.matrix.rules:
            if matches(coords, rule.when):
                settings.update(rule.set)
        settings.update(cli)
        name = f"{base.name}-{suffix(coords)}"
        data = copy.deepcopy(body)
        data["name"] = name
        for key, value in settings.items():
            set_dotted(data, key, value, f"{path} [variant {name}]:")
        variants.append(
            Variant(name, str(path), coords, settings, validate_dict(data, source=f"{path} [variant {name}]"))
        )
    return variants


def points(matrix) -> List[Dict[str, Any]]:
    """The product of the axes minus the excluded ones, then the included ones."""
    keys = list(matrix.axes)
    product = [dict(zip(keys, values)) for values in itertools.product(*matrix.axes.values())] if keys else []
    kept = [p for p in product if not any(matches(p, entry) for entry in matrix.exclude)]
    return kept + [dict(entry) for entry in matrix.include]


def matches(coords: Dict[str, Any], condition: Dict[str, Any]) -> bool:
    return all(key in coords and _same(coords[key], value) for key, value in condition.items())


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def suffix(coords: Dict[str, Any]) -> str:
    """Readable name part: strings as they are, other values with their key (sparsity0.8, no_augment)."""
    return "-".join(_short(key.split(".")[-1], value) for key, value in coords.items())


def _short(leaf: str, value: Any) -> str:
    if isinstance(value, bool):
        text = leaf if value else f"no_{leaf}"
    elif value is None:
        text = f"no_{leaf}"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, (list, tuple)):
        text = leaf + "_".join(str(v) for v in value)
    else:
        text = f"{leaf}{value}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _parse_overrides(overrides: Sequence[str], path: Path) -> Dict[str, Any]:
    """'a.b=value' strings -> {a.b: value}, parsed exactly like compress's overrides."""
    out: Dict[str, Any] = {}
    for item in overrides:
        holder: Dict[str, Any] = {}
        _apply_override(holder, str(item), path)
        key = str(item).partition("=")[0]
        node: Any = holder
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


# ---------------------------------------------------------------- running


def describe(variant: Variant) -> str:
    shown = shown_overrides(variant.overrides)
    return " ".join(f"{k}={_yaml_scalar(v)}" for k, v in shown.items()) or "(the recipe as written)"


def shown_overrides(overrides: Dict[str, Any]) -> Dict[str, Any]:
    """The overrides as they may be printed or written: every URI with its password masked
    (tracking.uri=http://user:password@host on the command line reaches every variant's overrides)."""
    from .tracking import mask_uri

    def masked(value: Any) -> Any:
        if isinstance(value, str):
            return mask_uri(value)
        if isinstance(value, dict):
            return {k: masked(v) for k, v in value.items()}
        if isinstance(value, list):
            return [masked(v) for v in value]
        return value

    return {key: masked(value) for key, value in overrides.items()}


def _yaml_scalar(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def select(variants: List[Variant], only: Optional[str]) -> List[Variant]:
    if not only:
        return variants
    chosen = [v for v in variants if fnmatch.fnmatch(v.name, only) or only in v.name]
    if not chosen:
        raise RecipeError(f"--only {only!r} matches no variant; variants: {', '.join(v.name for v in variants)}")
    return chosen


def run_sweep(
    path: str | Path,
    overrides: Sequence[str] = (),
    force: bool = False,
    dry_run: bool = False,
    only: Optional[str] = None,
    out=None,
) -> List[Outcome]:
    """Validate every variant, then run them in order; raises SweepError at the end if any failed."""
    out = out or sys.stdout
    variants = select(expand(path, overrides), only)
    check_plans(variants)
    total = len(variants)
    print(f"[sweep] {total} variant(s) from {path}, all validated", file=out, flush=True)
    if dry_run:
        for i, v in enumerate(variants, 1):
            print(f"[sweep {i}/{total}] {v.name}: {describe(v)}", file=out)
        return []
    started = time.perf_counter()
    recomputed: set = set()  # --force: each stage once per sweep (one teacher), see engine.context.RunContext
    outcomes: List[Outcome] = []
    for i, v in enumerate(variants, 1):
        t0 = time.perf_counter()
        try:
            outcomes.append(run_variant(v, i, total, force, out, recomputed))
        except KeyboardInterrupt:  # Ctrl-C / SIGTERM: the record still says what ran, and where it stopped
            outcomes.append(Outcome(v, "KILLED", time.perf_counter() - t0, error="interrupted"))
            write_record(outcomes)
            raise
    print(results_table(outcomes, time.perf_counter() - started), file=out, flush=True)
    write_record(outcomes)
    failed = [o.variant.name for o in outcomes if o.status != "FINISHED"]
    if failed:
        raise SweepError(
            f"sweep: {len(failed)} of {total} variants failed: {', '.join(failed)} (their errors are printed above)"
        )
    return outcomes


def check_plans(variants: List[Variant]) -> None:
    """Every variant's stages fit together (a stage's required stages are enabled), before the first runs."""
    from .engine.runner import plan

    for v in variants:
        try:
            plan(v.recipe)
        except RecipeError as exc:
            raise RecipeError(f"variant {v.name}: {exc}") from None


def run_variant(variant: Variant, i: int, total: int, force: bool, out, recomputed: Optional[set] = None) -> Outcome:
    from .engine.runner import compress

    print(f"\n[sweep {i}/{total}] {variant.name}: {describe(variant)}", file=out, flush=True)
    t0 = time.perf_counter()
    try:
        summary = compress(variant.recipe, force=force, recomputed=recomputed)
    except ToolchainError as exc:
        return _failed(variant, i, total, t0, str(exc), out)
    except Exception as exc:  # a bug: keep its traceback, but the other variants still run
        from .tracking import _redact, resolve_uri

        uri = resolve_uri(variant.recipe.tracking.uri)  # a library's message may hold the URI: print it masked
        sys.stderr.write(_redact(traceback.format_exc(), uri))
        return _failed(variant, i, total, t0, _redact(f"{type(exc).__name__}: {exc}", uri), out)
    seconds = time.perf_counter() - t0
    print(f"[sweep {i}/{total}] {variant.name}: finished in {seconds:.0f} s", file=out, flush=True)
    return Outcome(variant, "FINISHED", seconds, summary=summary)


def _failed(variant: Variant, i: int, total: int, t0: float, message: str, out) -> Outcome:
    _end_dangling_mlflow_run()
    seconds = time.perf_counter() - t0
    print(f"[sweep {i}/{total}] {variant.name}: FAILED after {seconds:.0f} s: {message}", file=out, flush=True)
    return Outcome(variant, "FAILED", seconds, error=message)


def _end_dangling_mlflow_run() -> None:
    """A variant that died between MLflow calls must not leave the next one nested in its run."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return
    while mlflow.active_run() is not None:
        mlflow.end_run(status="FAILED")


def _final_metrics(summary: Dict[str, Any]) -> Dict[str, float]:
    """The run's parent-run metrics (summary.json `metrics`): the shipped model's, and each stage's headline."""
    return summary.get("metrics", {})


def results_table(outcomes: Iterable[Outcome], seconds: float) -> str:
    header = f"{'variant':<44} {'status':<8} {'time':>6} {'test acc':>8} {'PE params':>9} {'PE latency':>10}"
    lines = ["", f"== sweep: {seconds:.0f} s ==", header, "-" * len(header)]
    for o in outcomes:
        m = _final_metrics(o.summary)
        cells = [m.get(k) for k in ("test_accuracy", "vs_teacher.pe_params", "vs_teacher.pe_latency")]
        acc, pe_p, pe_l = ("-" if c is None else f"{c:.4f}" if j == 0 else f"{c:.3f}" for j, c in enumerate(cells))
        lines.append(f"{o.variant.name:<44} {o.status:<8} {o.seconds:>5.0f}s {acc:>8} {pe_p:>9} {pe_l:>10}")
    lines.append("PE against the teacher; `python -m toolchain report EXPERIMENT` writes the full table and plots.")
    return "\n".join(lines)


def write_record(outcomes: List[Outcome]) -> None:
    """<output_dir>/sweep-<base>.json per recipe: what ran, how it ended, where its runs are."""
    from .fsutil import atomic_write_json

    by_source: Dict[str, List[Outcome]] = {}
    for o in outcomes:
        by_source.setdefault(o.variant.source, []).append(o)
    for source, group in by_source.items():
        recipe = group[0].variant.recipe
        base = Path(source).stem
        record = [
            {
                "name": o.variant.name,
                "status": o.status,
                "seconds": round(o.seconds, 1),
                "error": o.error,
                "overrides": shown_overrides(o.variant.overrides),
                "mlflow": o.summary.get("mlflow"),
            }
            for o in group
        ]
        atomic_write_json(Path(recipe.output_dir) / f"sweep-{base}.json", {"recipe": source, "variants": record})
