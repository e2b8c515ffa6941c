"""Typed stage outputs. A stage's result.json stores them; paths are relative to the stage's
cache folder (export/.cache/<stage>-<key>/), so an entry stays valid wherever output_dir is and
never points into another run's export/<run>/ folder.

Nothing here carries a run's identity (run name, recipe hash, MLflow ids): those are added
by the runner's publish step on every run, cache hit or miss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

ARTIFACT_TYPES: Dict[str, type] = {}  # class name (as stored in result.json) -> artifact class


def register_artifact(cls):
    """Class decorator: result.json files can store and load this artifact type (a frozen
    dataclass with a files() -> {relative path: sha256} method, which the runner verifies on reuse)."""
    ARTIFACT_TYPES[cls.__name__] = cls
    return cls


@register_artifact
@dataclass(frozen=True)
class ModelArtifact:
    """A model checkpoint (state_dict) and how to rebuild the module it fits."""

    checkpoint: str  # relative to the stage folder
    arch: str  # model reference: registry name, torchvision/<name>, timm/<name>, package.module:callable
    num_classes: int
    cifar_stem: bool = False
    keep_zeros: bool = False  # weight-pruned: training after this keeps the zeros
    sha256: str = ""
    kwargs: Dict[str, Any] = field(default_factory=dict)  # the model section's builder kwargs

    def files(self) -> Dict[str, str]:
        return {self.checkpoint: self.sha256}

    def spec(self) -> Dict[str, Any]:
        """How to build the architecture again (a later stage's model derived from this one keeps it).
        Pruned shapes need nothing more: they are restored from the checkpoint's tensor shapes."""
        return {"arch": self.arch, "cifar_stem": self.cifar_stem, "kwargs": dict(self.kwargs)}


@register_artifact
@dataclass(frozen=True)
class OnnxArtifact:
    """An exported ONNX file with what was measured on it (content only, no run identity)."""

    file: str  # relative to the stage folder
    stage: str  # the model stage it was exported from
    metadata: Dict[str, Any]  # preprocessing contract and model metrics, also in the file's metadata_props
    parity: Dict[str, Any]
    info: Dict[str, Any]  # exporter, opset, shapes, file size
    onnx_test_accuracy: float
    sha256: str = ""

    def files(self) -> Dict[str, str]:
        return {self.file: self.sha256}


@register_artifact
@dataclass(frozen=True)
class BenchArtifact:
    """onnxruntime latencies of the exported files (and PyTorch eager of the final model)."""

    file: str  # bench.json, relative to the stage folder
    latency_ms: Dict[str, float] = field(default_factory=dict)  # export role -> p50 at the smallest CPU batch
    sha256: str = ""

    def files(self) -> Dict[str, str]:
        return {self.file: self.sha256}


@register_artifact
@dataclass(frozen=True)
class PackageArtifact:
    """A folder of files (the device package), every one with its sha256, so the runner's
    verification on reuse covers each file, not just one."""

    folder: str  # relative to the stage folder
    file_hashes: Dict[str, str] = field(default_factory=dict)  # path inside the folder -> sha256

    def files(self) -> Dict[str, str]:
        return {f"{self.folder}/{name}": digest for name, digest in self.file_hashes.items()}


@dataclass
class StageResult:
    """What a stage computed: metrics, per-epoch history, typed artifacts, and free-form info
    (JSON) such as the per-layer pruning report."""

    metrics: Dict[str, float] = field(default_factory=dict)
    history: List[Dict[str, float]] = field(default_factory=list)
    artifacts: Dict[str, Any] = field(default_factory=dict)
    info: Dict[str, Any] = field(default_factory=dict)
    # a model stage's in-memory model, returned with its result (never written to result.json;
    # a cache hit rebuilds it with the stage's restore())
    module: Any = field(default=None, repr=False, compare=False)

    def to_json(self) -> Dict[str, Any]:
        arts = {name: {"type": type(a).__name__, **asdict(a)} for name, a in self.artifacts.items()}
        return {"metrics": self.metrics, "history": self.history, "artifacts": arts, "info": self.info}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "StageResult":
        arts = {}
        for name, body in data.get("artifacts", {}).items():
            body = dict(body)
            kind = body.pop("type")
            if kind not in ARTIFACT_TYPES:  # written by a newer toolchain, or edited: the runner recomputes
                raise ValueError(f"unknown artifact type {kind!r}; known: {', '.join(sorted(ARTIFACT_TYPES))}")
            arts[name] = ARTIFACT_TYPES[kind](**body)
        return cls(dict(data.get("metrics", {})), list(data.get("history", [])), arts, dict(data.get("info", {})))

    def model(self) -> Optional[ModelArtifact]:
        return self.artifacts.get("model")


def damaged_files(stage_dir: Path, result: StageResult) -> List[str]:
    """The artifact files of a cached result that are missing or no longer match their sha256."""
    from ..fsutil import file_sha256

    bad = []
    for art in result.artifacts.values():
        for relative, digest in art.files().items():
            path = stage_dir / relative
            if not path.is_file() or (digest and file_sha256(path) != digest):
                bad.append(relative)
    return bad
