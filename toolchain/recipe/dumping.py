"""Dumping: the recipe as YAML, as it may be shown (password masked), and its hash."""

from __future__ import annotations

import yaml

from ..formatting import stable_hash
from .schema import Recipe


def recipe_hash(recipe: Recipe) -> str:
    """The recipe's identity, published in summary.json, the ONNX metadata, the card, the package
    manifest and an MLflow tag. It hashes the tracking URI as saved (password masked): hashed raw, a
    dictionary attack (fill each guess into the saved recipe.yaml, hash, compare) would recover it.
    A URI without credentials masks to itself, so such recipes keep the hash they always had."""
    from ..tracking import mask_uri

    dump = recipe.model_dump(mode="json")
    dump["tracking"]["uri"] = mask_uri(dump["tracking"]["uri"])
    return stable_hash(dump)


def shown(recipe: Recipe) -> Recipe:
    """The recipe as it may be printed, written or logged: the tracking URI's password masked."""
    from ..tracking import mask_uri

    return recipe.model_copy(
        update={"tracking": recipe.tracking.model_copy(update={"uri": mask_uri(recipe.tracking.uri)})}
    )


def to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
