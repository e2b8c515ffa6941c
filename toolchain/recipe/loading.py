"""Loading: YAML read (with the alias-expansion guard), dotted overrides, validation, the first error."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Dict, Sequence

import yaml
from pydantic import ValidationError

from ..errors import RecipeError
from .schema import Recipe


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply dotted overrides (a.b=value), validate."""
    from ..models.refs import add_import_root

    path = Path(path)
    raw = _read_yaml(path)
    for item in overrides:
        _apply_override(raw, item, path)
    add_import_root(path.parent)  # model: package.module:callable may live next to the recipe
    return validate_dict(raw, source=str(path))


def validate_dict(raw: Dict[str, Any], source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_first_error(exc)}") from None


# A recipe is a few hundred values. YAML aliases (&a / *a) share one parsed node, so 1 KB of nested
# aliases loads in microseconds and then expands to billions of values in whatever walks it (validation,
# copies, hashing); past this many values once expanded, the file is refused before anything walks it.
MAX_EXPANDED_VALUES = 100_000


def _check_expansion(raw: Any, where: str) -> None:
    """Count the values `raw` holds with every alias expanded, without expanding: each shared node is
    sized once (memo by id). A node that contains itself (&a [*a]) is refused too."""
    sizes: Dict[int, int] = {}
    active: set = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise RecipeError(
                f"{where}: a YAML alias refers to a node that contains it (&anchor inside itself); write the values out"
            )
        active.add(key)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_EXPANDED_VALUES:
                raise RecipeError(
                    f"{where}: the YAML expands to more than {MAX_EXPANDED_VALUES:,} values through "
                    "aliases (&anchor / *alias, an alias bomb?); a recipe needs a few hundred: "
                    "write the values out or use fewer nested aliases"
                )
        active.discard(key)
        sizes[key] = total
        return total

    try:
        size(raw)
    except RecursionError:
        raise RecipeError(f"{where}: the YAML is nested too deeply; a recipe is a few levels of sections") from None


def _read_yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found; pass the path to a YAML recipe (see recipes/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}: malformed YAML{where}: {problem}; fix the syntax") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file; a recipe is YAML text") from None
    except RecursionError:
        raise RecipeError(f"{path}: the YAML is nested too deeply; a recipe is a few levels of sections") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: the recipe must be a YAML mapping (key: value), got {type(raw).__name__}")
    _check_expansion(raw, str(path))
    return raw


def _apply_override(raw: Dict[str, Any], item: str, path: Path) -> None:
    key, sep, text = str(item).partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise RecipeError(f"{path}: override {item!r} is not of the form section.key=value (e.g. distill.epochs=1)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    _check_expansion(value, f"{path}: override {key}")
    set_dotted(raw, key, value, f"{path}: override")


def set_dotted(raw: Dict[str, Any], key: str, value: Any, where: str) -> None:
    """raw[a][b] = value for key 'a.b', creating missing (or null) sections."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"{where} {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key; check the spelling (see `python -m toolchain validate --help` and recipes/)"
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    got = err.get("input")
    got_text = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{loc}: {msg}{got_text}"
