"""Model sources: the forms a recipe's `model:` may take, one class each, in the SOURCES registry.

    resnet18                  registry     the toolchain's builders (registry.py: small-input adaptations)
    torchvision/<name>        torchvision  any torchvision classification model (list_models(module=torchvision.models))
    timm/<name>[.<tag>]       timm         any timm model
    package.module:callable   callable     the user's own factory, importable from PYTHONPATH or the recipe's
                                           folder, called as callable(num_classes=N, **kwargs) -> nn.Module

A source owns everything about its form: which references are its own (`claims`), checking one
without importing torch (recipe validation calls `check`), building the architecture, and its
library weights: which `weights:` values it accepts, loading them, what they are (the stage key)
and how they expect images (the data layer). refs.py, weights.py and resolve.py dispatch through
SOURCES and never name a source, so a new source is one ModelSource subclass under
@register_source, nothing else (CONTRIBUTING.md, "Add a model source";
tests/test_model_sources.py adds a toy one).

Checking a reference must stay fast, so the torchvision and timm names are read from their source
files' @register_model decorators instead of importing the libraries (3-5 s, and torch with them).
Importing and calling the user's callable is `build`'s job: the pipeline's preflight does it before
any training.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional

from ..errors import CheckpointError, RecipeError, first_line
from ..registry import Registry
from .heads import log, replace_heads


@dataclass(frozen=True)
class Reference:
    kind: str  # the source's name in SOURCES: registry | torchvision | timm | callable | ...
    name: str  # the reference without its source's prefix: a model name, or "module:attribute"

    @property
    def source(self) -> "ModelSource":
        return SOURCES.get(self.kind)

    @property
    def module(self) -> str:
        return self.name.partition(":")[0]

    @property
    def attribute(self) -> str:
        return self.name.partition(":")[2]


class ModelSource:
    """One form of a recipe's `model:`. Set the class attributes, override what applies, decorate the
    class with @register_source. The defaults fit a source without library weights (`weights:` is
    then a state_dict file or nothing)."""

    name: str = ""  # its key in SOURCES and Reference.kind
    prefix: str = ""  # e.g. "timm/": it claims every reference that starts with it
    form: str = ""  # how its references are written, for messages: "timm/<name>"
    order: int = 50  # sources are asked to claim a reference in this order (prefixes never overlap)
    weights_forms: str = ""  # the library `weights:` it accepts besides a file, for messages; "" for none
    cifar_stem: bool = False  # whether the section's cifar_stem: applies (it is passed to build)
    hf_hub: bool = False  # its weights come from the Hugging Face hub (offline mode when it is unreachable)

    def claims(self, ref: str) -> bool:
        return bool(self.prefix) and ref.startswith(self.prefix)

    def parse(self, ref: str) -> Reference:
        return Reference(self.name, ref[len(self.prefix) :])

    def check(self, ref: Reference) -> None:
        """Recipe validation, without importing torch: a one-line ValueError unless `ref` exists."""

    def build(self, ref: Reference, num_classes: int, cifar_stem: bool, kwargs: Dict[str, Any]):
        """The architecture with `num_classes` outputs, randomly initialised (refs.build turns what this
        raises into one line, and checks that it returned an nn.Module)."""
        raise NotImplementedError

    def accepts_weights(self, weights: str) -> bool:
        """Recipe validation (no torch): `weights`, not a file name, has the form of this source's
        library weights."""
        return False

    def create_pretrained(self, ref: Reference, weights: str, num_classes: int, kwargs: Dict[str, Any]):
        """The model with the library weights `weights`, its classifier fitted to `num_classes`."""
        raise NotImplementedError(f"model source {self.name!r} has no library weights")

    def weights_identity(self, ref: Reference, weights: str) -> str:
        """What the library weights are, resolved (DEFAULT moves between releases): the stage key."""
        raise NotImplementedError(f"model source {self.name!r} has no library weights")

    def weights_preprocessing(self, ref: Reference, weights: str) -> Optional[Dict[str, Any]]:
        """How the library weights expect images (resolve.weights_preprocessing), or None."""
        return None


SOURCES: Registry[ModelSource] = Registry("model source")


def register_source(cls):
    """Class decorator: one instance of the source goes into SOURCES."""
    if not cls.name or not cls.form:
        raise ValueError(f"model source {cls.__name__}: set its name and form")
    if cls.prefix and not cls.prefix.endswith("/"):
        raise ValueError(f"model source {cls.name}: prefix {cls.prefix!r} must end with '/'")
    SOURCES.register(cls.name)(cls())
    return cls


def in_order() -> List[ModelSource]:
    """Every source, in the order they are asked to claim a reference."""
    return sorted((SOURCES.get(n) for n in SOURCES.names()), key=lambda s: s.order)


def parse(ref: str) -> Reference:
    for source in in_order():
        if source.claims(ref):
            return source.parse(ref)
    raise ValueError(f"model {ref!r}: no model source claims it; use {forms()}")


def forms(leave_out: Optional[ModelSource] = None) -> str:
    return ", ".join(s.form for s in in_order() if s is not leave_out)


# ---------------------------------------------------------------- registry


@register_source
class RegistrySource(ModelSource):
    """resnet18, cifar_resnet20, ...: the toolchain's builders (registry.py); the one source whose
    architectures take a CIFAR stem. Claims what no other source does, so it is asked last."""

    name, form, order, cifar_stem = "registry", "a registered name (python -m toolchain list models)", 100, True

    def claims(self, ref: str) -> bool:
        return True

    def check(self, ref: Reference) -> None:
        from .registry import MODELS

        if ref.name in MODELS:
            return
        if "/" in ref.name:  # registered names have none: a source's prefix, mistyped
            prefix = ref.name.partition("/")[0] + "/"
            close = difflib.get_close_matches(prefix, [s.prefix for s in in_order() if s.prefix], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"model {ref.name!r}: unknown model source {prefix!r}.{hint} Valid: {forms()}")
        raise ValueError(MODELS.unknown_message(ref.name) + f"; or use {forms(leave_out=self)}")

    def build(self, ref: Reference, num_classes: int, cifar_stem: bool, kwargs: Dict[str, Any]):
        from .registry import build_model

        return build_model(ref.name, num_classes, cifar_stem, **kwargs)


# ---------------------------------------------------------------- libraries: torchvision, timm

# @register_model / @register_model(), maybe more decorators, then `def name(`
_REGISTERED = re.compile(r"^@register_model(?:\(\))?[ \t]*\n(?:@.*\n)*def[ \t]+(\w+)[ \t]*\(", re.M)


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


class LibrarySource(ModelSource):
    """A library whose models register with @register_model; its name is its package's."""

    lister: str = ""  # the command that lists its models, for messages

    def model_name(self, name: str) -> str:
        """The registered model a reference's name builds on."""
        return name

    def check(self, ref: Reference) -> None:
        names = library_models(self.name)
        base = self.model_name(ref.name)
        if base not in names:
            close = difflib.get_close_matches(base, names, n=3)
            hint = f"; did you mean {', '.join(f'{self.prefix}{c}' for c in close)}?" if close else ""
            raise ValueError(
                f"unknown {self.name} model {ref.name!r}{hint} ({len(names)} {self.name} models exist; "
                f"list them with {self.lister})"
            )


@register_source
class TorchvisionSource(LibrarySource):
    """torchvision/<name>; weights: a member of the model's weights enum (DEFAULT, IMAGENET1K_V1, ...),
    downloaded through torch hub's cache."""

    name, prefix, form, order = "torchvision", "torchvision/", "torchvision/<name>", 10
    weights_forms = "DEFAULT or an enum name such as IMAGENET1K_V1"
    lister = '`python -c "import torchvision; print(torchvision.models.list_models(module=torchvision.models))"`'

    def build(self, ref: Reference, num_classes: int, cifar_stem: bool, kwargs: Dict[str, Any]):
        import torchvision.models as tvm

        return tvm.get_model(ref.name, weights=None, num_classes=num_classes, **kwargs)

    def accepts_weights(self, weights: str) -> bool:
        return weights.isidentifier() and weights.upper() == weights  # the member is checked when built

    def weights_enum(self, ref: Reference, weights: str):
        import torchvision.models as tvm

        members = tvm.get_model_weights(ref.name)
        if weights not in members.__members__:
            raise CheckpointError(
                f"model torchvision/{ref.name}: no weights {weights!r}; choose one of {', '.join(members.__members__)}"
            )
        return members[weights]

    def create_pretrained(self, ref: Reference, weights: str, num_classes: int, kwargs: Dict[str, Any]):
        import torchvision.models as tvm

        enum = self.weights_enum(ref, weights)
        try:  # the builder with weights sets what they need (e.g. inception's transform_input)
            model = tvm.get_model(ref.name, weights=enum, **kwargs)
        except OSError as exc:  # URLError and friends: no network
            name = enum.url.rsplit("/", 1)[-1]
            raise CheckpointError(
                f"model torchvision/{ref.name} weights {enum}: download failed ({first_line(exc)}); offline, put "
                f"{name} (from {enum.url}) at {_torch_hub_dir()}/{name}, or set weights: to a local state_dict file"
            ) from None
        replace_heads(model, len(enum.meta["categories"]), num_classes, f"torchvision/{ref.name}")
        return model

    def weights_identity(self, ref: Reference, weights: str) -> str:
        enum = self.weights_enum(ref, weights)
        return f"{enum} {enum.url}"

    def weights_preprocessing(self, ref: Reference, weights: str) -> Optional[Dict[str, Any]]:
        t = self.weights_enum(ref, weights).transforms()
        crop, resize = t.crop_size[0], t.resize_size[0]
        return {
            "mean": [float(v) for v in t.mean],
            "std": [float(v) for v in t.std],
            "image_size": [crop, crop],
            "crop_pct": round(crop / resize, 4),
            "interpolation": t.interpolation.value,
        }


def _torch_hub_dir() -> str:
    import torch.hub

    return str(Path(torch.hub.get_dir()) / "checkpoints")


@register_source
class TimmSource(LibrarySource):
    """timm/<name>[.<pretrained tag>]; weights: `pretrained`, timm's default tag or the one in the
    name, downloaded through the Hugging Face hub's cache."""

    name, prefix, form, order = "timm", "timm/", "timm/<name>", 20
    weights_forms = "pretrained"
    hf_hub = True
    lister = '`python -c "import timm; print(timm.list_models())"`'

    def model_name(self, name: str) -> str:
        return name.partition(".")[0]  # timm/<name>.<pretrained tag>

    def build(self, ref: Reference, num_classes: int, cifar_stem: bool, kwargs: Dict[str, Any]):
        import timm

        return timm.create_model(ref.name, pretrained=False, num_classes=num_classes, **kwargs)

    def accepts_weights(self, weights: str) -> bool:
        return weights == "pretrained"

    def pretrained_cfg(self, ref: Reference):
        import timm
        import timm.models

        try:
            cfg = timm.models.get_pretrained_cfg(ref.name)
        except RuntimeError:  # timm: "Invalid pretrained tag (x) for arch"
            arch, _, tag = ref.name.partition(".")
            tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
            shown = ", ".join(tags[:8]) + (f" (and {len(tags) - 8} more)" if len(tags) > 8 else "")
            raise CheckpointError(
                f"model timm/{ref.name}: timm has no pretrained tag {tag!r} for {arch}; "
                + (
                    f"use timm/{arch}.<tag> with one of: {shown}"
                    if tags
                    else "it has no pretrained weights at all: set weights: to a local file"
                )
            ) from None
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            raise CheckpointError(
                f"model timm/{ref.name}: timm has no pretrained weights for it; "
                "pick a tag from timm.list_models(pretrained=True) or set weights: to a local file"
            )
        return cfg

    def create_pretrained(self, ref: Reference, weights: str, num_classes: int, kwargs: Dict[str, Any]):
        import timm

        cfg = self.pretrained_cfg(ref)
        try:  # timm drops the classifier weights itself when num_classes differs
            model = timm.create_model(ref.name, pretrained=True, num_classes=num_classes, **kwargs)
        except (OSError, RuntimeError) as exc:  # huggingface_hub's LocalEntryNotFoundError is an OSError
            hub_id = cfg.hf_hub_id or ref.name
            raise CheckpointError(
                f"model timm/{ref.name}: pretrained weights not downloadable ({first_line(exc, 120)}); offline, run "
                f"`hf download {hub_id}` where there is internet and copy its folder "
                f"models--{hub_id.replace('/', '--')} into {_hf_cache()}, or download model.safetensors from "
                f"https://huggingface.co/{hub_id} and set weights: to its path"
            ) from None
        if cfg.num_classes and cfg.num_classes != num_classes:
            log(
                f"timm/{ref.name}: classifier {cfg.classifier!r} re-initialised for {num_classes} classes "
                f"(the weights have {cfg.num_classes})"
            )
        return model

    def weights_identity(self, ref: Reference, weights: str) -> str:
        cfg = self.pretrained_cfg(ref)
        return f"{cfg.hf_hub_id or cfg.url or cfg.file} {cfg.tag}"

    def weights_preprocessing(self, ref: Reference, weights: str) -> Optional[Dict[str, Any]]:
        from timm.data import resolve_data_config

        cfg = resolve_data_config(pretrained_cfg=self.pretrained_cfg(ref).to_dict())
        return {
            "mean": [float(v) for v in cfg["mean"]],
            "std": [float(v) for v in cfg["std"]],
            "image_size": list(cfg["input_size"][1:]),
            "crop_pct": float(cfg["crop_pct"]),
            "interpolation": _interpolation(cfg["interpolation"]),
        }


def _hf_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _interpolation(name: str) -> str:
    """timm also names 'random' or 'lanczos'; the data layer knows bilinear, bicubic, nearest."""
    return name if name in ("bilinear", "bicubic", "nearest") else "bilinear"


# ---------------------------------------------------------------- the user's callable


@register_source
class CallableSource(ModelSource):
    """package.module:callable, the user's factory: checked by finding the module (not importing it),
    built by importing it and calling callable(num_classes=N, **kwargs)."""

    name, form, order = "callable", "package.module:callable", 90
    pattern = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

    def claims(self, ref: str) -> bool:
        return ":" in ref

    def check(self, ref: Reference) -> None:
        if not self.pattern.match(ref.name):
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

    def build(self, ref: Reference, num_classes: int, cifar_stem: bool, kwargs: Dict[str, Any]):
        return self.load(ref)(num_classes=num_classes, **kwargs)

    def load(self, ref: Reference):
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
