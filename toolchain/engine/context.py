"""What one `compress` run holds while its stages run: the recipe, shared data and device,
tracking, the run folder, and every finished stage's output."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple, Union

from .stage import STAGES, StageOutput
from .summary import Summary

if TYPE_CHECKING:
    import torch

    from ..data.loaders import DataBundle
    from ..recipe import Recipe
    from ..tracking import NullTracker, StageRun, Tracker


@dataclass
class RunContext:
    recipe: "Recipe"  # the validated recipe: only the runner and publish steps read it whole
    device: "torch.device"
    data: "DataBundle"
    data_key: str
    tracker: Union["Tracker", "NullTracker"]
    parent: "StageRun"  # the parent MLflow run's handle
    run_dir: (
        Path  # where publish steps write this run's files: a staging folder swapped in for export/<run>/ at the end
    )
    cache_dir: Path  # export/.cache/: content-keyed stage folders
    summary: Summary
    force: bool = False
    # (stage, key) pairs already recomputed under force: a sweep shares one set, so --force
    # recomputes each stage once per sweep (one teacher), not once per variant
    recomputed: Set[Tuple[str, str]] = field(default_factory=set)
    outputs: Dict[str, StageOutput] = field(default_factory=dict)
    final_dir: Optional[Path] = None  # export/<run>/ itself (engine/publish.py); None: run_dir is it

    @property
    def publish_dir(self) -> Path:
        return self.final_dir or self.run_dir

    def model_stages(self) -> List[str]:
        return [name for name in self.outputs if STAGES.get(name).makes_model]

    def final_model(self) -> Optional[StageOutput]:
        """The model this run ships: the output of its last model stage."""
        names = self.model_stages()
        return self.outputs[names[-1]] if names else None

    def identity(self) -> Dict[str, Any]:
        """Who this run is: stamped into every run-specific output, never into the cache."""
        from .. import __version__
        from ..recipe import recipe_hash

        return {
            "run_name": self.recipe.name,
            "recipe_hash": recipe_hash(self.recipe),
            "toolchain_version": __version__,
            "mlflow": self.summary.data.get("mlflow"),
        }

    def publication(self, inputs: Dict[str, StageOutput]) -> "Publication":
        """What one stage's publish step sees: this run's records and that stage's declared inputs."""
        return Publication(
            self.recipe, self.data, self.tracker, self.parent, self.run_dir, self.summary, inputs, self.identity()
        )


@dataclass(frozen=True)
class Publication:
    """A publish step's view of the run: where this run's files go (run_dir, the staging folder of
    export/<run>/), its summary, parent MLflow run and identity, and the outputs the stage declared
    (its compute inputs plus its publish-only `reads`, by role). Other stages' outputs are not in it."""

    recipe: "Recipe"  # the model card describes the whole job
    data: "DataBundle"
    tracker: Union["Tracker", "NullTracker"]
    parent: "StageRun"
    run_dir: Path
    summary: Summary
    inputs: Dict[str, StageOutput]
    identity: Dict[str, Any]

    def final(self) -> Optional[StageOutput]:
        """The model this run ships, where the stage declared it (role `final`)."""
        return self.inputs.get("final")
