"""Registry-name checks for the validators: each registry is imported when a value is checked,
not when the schema is imported (`python -m toolchain --help` imports no torch)."""

from __future__ import annotations


def _check_name(registry_getter, value: str) -> str:
    registry = registry_getter()
    if value not in registry:
        raise ValueError(registry.unknown_message(value))
    return value


def _model_ref(value: str) -> str:
    from ..models.refs import check_reference

    return check_reference(value)


def _datasets():
    from ..data.datasets import DATASETS

    return DATASETS


def _losses():
    from ..train.losses import LOSSES

    return LOSSES


def _loss_needs_teacher(name: str) -> bool:
    from ..train.losses import get_loss

    return get_loss(name).needs_teacher


def _pruners():
    from ..prune.registry import PRUNERS

    return PRUNERS


def _quant_candidates():
    from ..onnx.quantize import CANDIDATES

    return CANDIDATES
