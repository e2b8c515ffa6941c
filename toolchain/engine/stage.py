"""The stage contract and the STAGES registry.

A stage is one file in toolchain/stages/ plus its recipe section. It declares:
  name              its registry name
  consumes          the stages whose outputs its inputs()/reads() may name (MODELS: every model
                    stage); the plan runs it after each of them that the recipe enables
                    (engine/runner.py `ordered`: derived from this, ties by name)
  requires          consumed stages it cannot run without (stage -> why): a recipe that enables it
                    without them is a one-line RecipeError before anything runs
  sections          the recipe sections it reads: it is handed exactly these, and the
                    runner's cache key covers exactly these
  checked           sections its preflight also reads (e.g. the student architecture the
                    prune check prunes); never part of the key, never seen by compute()
  inputs()          the earlier stages whose outputs it consumes (role -> stage name)
  reads()           outputs its publish step also reads (references for PE, the final model):
                    handed to publish with the inputs, never part of the cache key
  followers         what the other ranks do under torchrun: train | load | wait
  uses_data         whether its output depends on the dataset (adds the data key)
  revision          code revisions its output depends on (name -> int): bump one and the runner's
                    cache key changes, so cached outputs of the old code are recomputed
  compute()         the work, on a cache miss; returns a StageResult (a model stage's carries its model)
  restore()         on a cache hit (and on torchrun followers): rebuild in-memory state
  publish()         run-specific outputs on every run, hit or miss (files under export/<run>/,
                    MLflow artifacts, metrics derived from its inputs and reads such as PE),
                    through a Publication (engine/context.py): never other stages by name
It never sees the run name, recipe hash or MLflow ids while computing, so a cached output
cannot carry another run's identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional, Sequence, Tuple

from ..registry import Registry
from .artifacts import StageResult

if TYPE_CHECKING:  # annotations only: the engine does not import torch or the data package to type its seams
    import torch

    from ..data.loaders import DataBundle
    from ..recipe import (
        BenchConfig,
        ExportConfig,
        PackageConfig,
        PruneConfig,
        QuantizeConfig,
        StudentConfig,
        TeacherConfig,
        TrainConfig,
    )
    from ..tracking import StageRun

FOLLOWER_ROLES = ("train", "load", "wait")
MODELS = "<models>"  # in `consumes`: every model stage (export ships the last one, whichever it is)


class Sections(SimpleNamespace):
    """The recipe sections a stage declared (`sections`, plus `checked` in its preflight), by name,
    typed as the recipe schema validated them; a section the stage did not declare is absent."""

    teacher: Optional["TeacherConfig"]
    student: "StudentConfig"
    distill: "TrainConfig"
    prune: Optional["PruneConfig"]
    finetune: Optional["TrainConfig"]
    export: Optional["ExportConfig"]
    quantize: Optional["QuantizeConfig"]
    bench: Optional["BenchConfig"]
    package: Optional["PackageConfig"]


@dataclass
class StageOutput:
    """A finished stage as later stages and the publish step see it."""

    name: str
    key: str
    stage_dir: Path
    result: StageResult
    model: Any = None  # the in-memory model for model stages
    cached: bool = False
    run_id: Optional[str] = None  # the stage's MLflow child run
    derived: Dict[str, float] = field(default_factory=dict)  # metrics added at publish (PE...)

    def path(self, relative: str) -> Path:
        return self.stage_dir / relative

    @property
    def metrics(self) -> Dict[str, float]:
        return {**self.result.metrics, **self.derived}


@dataclass(frozen=True)
class Job:
    """Everything a stage's compute/restore may read. Deliberately no recipe, run name or run folder.
    Frozen: a stage's one way out is the StageResult compute returns (with its model)."""

    name: str
    cfg: Sections  # the declared recipe sections, by name
    inputs: Dict[str, StageOutput]  # role -> output of an earlier stage
    data: "DataBundle"
    device: "torch.device"
    seed: int
    stage_dir: Path
    run: "StageRun"  # the stage's tracking handle (a NullStageRun on torchrun followers)


class Stage:
    name: ClassVar[str]
    sections: ClassVar[Tuple[str, ...]]
    consumes: ClassVar[Tuple[str, ...]] = ()
    requires: ClassVar[Dict[str, str]] = {}
    checked: ClassVar[Tuple[str, ...]] = ()
    followers: ClassVar[str] = "wait"
    uses_data: ClassVar[bool] = True
    makes_model: ClassVar[bool] = False
    revision: ClassVar[Dict[str, int]] = {}
    row_label: ClassVar[Optional[str]] = None  # a model stage's row in the closing table ("KD student")

    def enabled(self, recipe) -> bool:
        """Runs when its first section is present in the recipe."""
        return getattr(recipe, self.sections[0]) is not None

    def inputs(self, cfg: Sections, models: Sequence[str], ran: Sequence[str]) -> Dict[str, str]:
        """role -> stage name; `models` are the model stages that ran before, in order; `ran` all earlier stages."""
        return {}

    def reads(self, cfg: Sections, models: Sequence[str], ran: Sequence[str]) -> Dict[str, str]:
        """role -> stage name of outputs only the publish step reads (not part of the cache key)."""
        return {}

    def preflight(self, cfg: Sections, data: "DataBundle") -> None:
        """Checks of the sections against the loaded data, run for every planned stage before the
        first one computes: a bad setting fails in seconds, not after an hour of training."""

    def fingerprint(self, cfg: Sections) -> Dict[str, Any]:
        """Content the sections only point at (files named by path), for the cache key."""
        return {}

    def params(self, cfg: Sections) -> Dict[str, Any]:
        """What the stage's MLflow child run shows as params: its sections, flattened."""
        from ..tracking import flatten

        return flatten({n: s.model_dump(mode="json") for n, s in vars(cfg).items() if s is not None})

    def compute(self, job: Job) -> StageResult:
        raise NotImplementedError

    def restore(self, job: Job, result: StageResult) -> Any:
        return None

    def publish(self, pub, output: StageOutput, child) -> Dict[str, float]:
        """Run-specific outputs (pub: a Publication); returns metrics derived from its inputs and reads."""
        return {}

    def headline(self, output: StageOutput) -> Dict[str, float]:
        """Metrics this stage adds to the parent run, under the names the MLflow runs table shows."""
        return {}

    def summary_lines(self, entry: Dict[str, Any]) -> List[str]:
        """Lines this stage adds to the closing table below the model rows, read from its
        summary.json entry (metrics, info): the display code never names a stage."""
        return []


STAGES: Registry[Stage] = Registry("stage")


def register_stage(cls):
    """Class decorator: one instance of the stage goes into STAGES."""
    if cls.followers not in FOLLOWER_ROLES:
        raise ValueError(f"stage {cls.name}: followers={cls.followers!r}; expected one of {FOLLOWER_ROLES}")
    if not set(cls.requires) <= set(cls.consumes):
        raise ValueError(f"stage {cls.name}: requires {sorted(cls.requires)} must be among consumes {cls.consumes}")
    STAGES.register(cls.name)(cls())
    return cls
