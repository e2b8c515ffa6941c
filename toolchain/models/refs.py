"""Model references: what a recipe's `model:` may name, and how to build its architecture.

    resnet18                  the toolchain's registry (registry.py: small-input adaptations)
    torchvision/<name>        any torchvision classification model (list_models(module=torchvision.models))
    timm/<name>[.<tag>]       any timm model
    package.module:callable   the user's own factory, importable from PYTHONPATH or the recipe's
                              folder, called as callable(num_classes=N, **kwargs) -> nn.Module

Each form is a model source, one class in sources.py's SOURCES registry; this module is their face
for the recipe schema and the stages (parse, check, build) and names none of them. Checking a
reference (recipe validation) imports neither torch nor the libraries; importing and calling the
user's callable is `build`'s job: the pipeline's preflight does it before any training.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from ..errors import RecipeError, first_line
from .sources import Reference, in_order, library_models, parse  # noqa: F401  (Reference, library_models: API)

# ---------------------------------------------------------------- checking names (no torch)


def check_reference(ref: str) -> str:
    """The reference if it names something that exists; else ValueError, one line with close matches."""
    parsed = parse(ref)
    parsed.source.check(parsed)
    return ref


def check_cifar_stem(ref: str) -> None:
    """Recipe validation: cifar_stem: true fits the reference's source; else ValueError, one line."""
    if not parse(ref).source.cifar_stem:
        takers = " and ".join(s.name for s in in_order() if s.cifar_stem)
        raise ValueError(f"cifar_stem applies to {takers} models only, not {ref!r}; remove it")


def add_import_root(folder: str | Path) -> None:
    """Make the user's model code next to a recipe importable, as Python does for a script's folder."""
    folder = str(Path(folder).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)


# ---------------------------------------------------------------- building (random init)


def build(ref: str, num_classes: int, cifar_stem: bool = False, kwargs: Optional[Mapping[str, Any]] = None):
    """The architecture `ref` names with `num_classes` outputs, randomly initialised (no weights)."""
    parsed, kwargs = parse(ref), dict(kwargs or {})
    return _called(ref, lambda: parsed.source.build(parsed, num_classes, cifar_stem, kwargs))


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
