"""Model references: what a recipe's `model:` may name, and how to build its architecture.

    resnet18                  the toolchain's registry (registry.py: small-input adaptations)
    torchvision/<name>        any torchvision classification model (list_models(module=torchvision.models))
    timm/<name>[.<tag>]       any timm model
    package.module:callable   the user's own factory, importable from PYTHONPATH or the recipe's
                              folder, called as callable(num_classes=N, **kwargs) -> nn.Module

Checking a reference (recipe validation) must stay fast, so the torchvision and timm names are
read from their source files' @register_model decorators instead of importing the libraries
(3-5 s, and torch with them). Importing and calling the user's callable is `build`'s job: the
pipeline's preflight does it before any training.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, FrozenSet, Mapping, Optional

from ..errors import RecipeError, first_line

LIBRARIES = ("torchvision", "timm")
CALLABLE_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
# @register_model / @register_model(), maybe more decorators, then `def name(`
_REGISTERED = re.compile(r"^@register_model(?:\(\))?[ \t]*\n(?:@.*\n)*def[ \t]+(\w+)[ \t]*\(", re.M)


@dataclass(frozen=True)
class Reference:
    kind: str  # registry | torchvision | timm | callable
    name: str  # registry/library model name, or "module:attribute" for callable

    @property
    def module(self) -> str:
        return self.name.partition(":")[0]

    @property
    def attribute(self) -> str:
        return self.name.partition(":")[2]


def parse(ref: str) -> Reference:
    library, sep, name = ref.partition("/")
    if sep and library in LIBRARIES:
        return Reference(library, name)
    if ":" in ref:
        return Reference("callable", ref)
    return Reference("registry", ref)


# ---------------------------------------------------------------- checking names (no torch)


def check_reference(ref: str) -> str:
    """The reference if it names something that exists; else ValueError, one line with close matches."""
    parsed = parse(ref)
    if parsed.kind == "callable":
        _check_callable_reference(parsed)
    elif parsed.kind == "registry":
        from .registry import MODELS

        if ref not in MODELS:
            raise ValueError(
                MODELS.unknown_message(ref) + "; or use torchvision/<name>, timm/<name>, package.module:callable"
            )
    else:
        names = library_models(parsed.kind)
        base = parsed.name.partition(".")[0] if parsed.kind == "timm" else parsed.name  # timm: name.pretrained_tag
        if base not in names:
            close = difflib.get_close_matches(base, names, n=3)
            hint = f"; did you mean {', '.join(f'{parsed.kind}/{c}' for c in close)}?" if close else ""
            raise ValueError(
                f"unknown {parsed.kind} model {parsed.name!r}{hint} ({len(names)} {parsed.kind} models exist; "
                f"list them with {_lister(parsed.kind)})"
            )
    return ref


def _lister(library: str) -> str:
    if library == "timm":
        return '`python -c "import timm; print(timm.list_models())"`'
    return '`python -c "import torchvision; print(torchvision.models.list_models(module=torchvision.models))"`'


@functools.lru_cache(maxsize=None)
def library_models(library: str) -> FrozenSet[str]:
    """Classification model names a library registers (torchvision: top-level models package only,
    which is exactly list_models(module=torchvision.models); timm: all of timm.list_models())."""
    spec = importlib.util.find_spec(library)
    if spec is None or spec.origin is None:
        raise ValueError(f"model {library}/...: {library} is not installed; pip install -c constraints.txt {library}")
    folder = Path(spec.origin).parent / "models"
    names = set()
    for path in folder.glob("*.py"):
        names.update(_REGISTERED.findall(path.read_text(encoding="utf-8", errors="replace")))
    return frozenset(names)


def _check_callable_reference(ref: Reference) -> None:
    if not CALLABLE_PATTERN.match(ref.name):
        raise ValueError(
            f"model {ref.name!r}: a user model is written package.module:callable (e.g. mymodels.nets:build)"
        )
    try:
        found = importlib.util.find_spec(ref.module)  # imports the parent packages only, not the module
    except (ImportError, ValueError) as exc:
        raise ValueError(f"model {ref.name!r}: cannot import {ref.module!r} ({first_line(exc)})") from None
    if found is None:
        raise ValueError(
            f"model {ref.name!r}: module {ref.module!r} not found on PYTHONPATH or next to the recipe; "
            "put the package next to the recipe file or add its folder to PYTHONPATH"
        )


def add_import_root(folder: str | Path) -> None:
    """Make the user's model code next to a recipe importable, as Python does for a script's folder."""
    folder = str(Path(folder).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)


# ---------------------------------------------------------------- building (random init)


def build(ref: str, num_classes: int, cifar_stem: bool = False, kwargs: Optional[Mapping[str, Any]] = None):
    """The architecture `ref` names with `num_classes` outputs, randomly initialised (no weights)."""
    parsed, kwargs = parse(ref), dict(kwargs or {})
    if parsed.kind == "registry":
        from .registry import build_model

        return _called(ref, lambda: build_model(ref, num_classes, cifar_stem, **kwargs))
    if parsed.kind == "torchvision":
        import torchvision.models as tvm

        return _called(ref, lambda: tvm.get_model(parsed.name, weights=None, num_classes=num_classes, **kwargs))
    if parsed.kind == "timm":
        import timm

        return _called(ref, lambda: timm.create_model(parsed.name, pretrained=False, num_classes=num_classes, **kwargs))
    factory = load_callable(parsed)
    return _called(ref, lambda: factory(num_classes=num_classes, **kwargs))


def load_callable(ref: Reference):
    try:
        module = importlib.import_module(ref.module)
    except Exception as exc:  # noqa: BLE001  (the user's module may raise anything at import)
        raise RecipeError(
            f"model {ref.name!r}: importing {ref.module!r} failed: {type(exc).__name__}: {first_line(exc)}; "
            "fix the module or PYTHONPATH"
        ) from None
    target: Any = module
    for part in ref.attribute.split("."):
        if not hasattr(target, part):
            public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            close = difflib.get_close_matches(part, public, n=1)
            hint = f" Did you mean {ref.module}:{close[0]}?" if close else ""
            raise RecipeError(f"model {ref.name!r}: module {ref.module!r} has no attribute {part!r}.{hint}")
        target = getattr(target, part)
    if not callable(target):
        raise RecipeError(
            f"model {ref.name!r}: {ref.attribute!r} is a {type(target).__name__}, not a callable that builds a model"
        )
    return target


def _called(ref: str, make):
    import torch.nn as nn

    try:
        model = make()
    except RecipeError:
        raise
    except Exception as exc:  # noqa: BLE001  (a builder may raise anything; the user needs the one line)
        raise RecipeError(
            f"model {ref!r}: building it raised {type(exc).__name__}: {first_line(exc)}; "
            "check the model's kwargs in the recipe"
        ) from None
    if not isinstance(model, nn.Module):
        raise RecipeError(
            f"model {ref!r}: the builder returned {type(model).__name__}, not a torch.nn.Module; "
            "return the model object"
        )
    return model
