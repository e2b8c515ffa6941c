"""From the trained model to measured files: export, the latency comparison, bench, quantize, package."""

from __future__ import annotations

from typing import List, Literal, Optional

from pydantic import Field, field_validator, model_validator

from .base import Section
from .names import _check_name, _quant_candidates
from .training import FeatureConfig, TrainConfig


class ExportConfig(Section):
    exporter: Literal["dynamo", "torchscript"] = Field("dynamo", description="torch.onnx exporter, chosen explicitly.")
    opset: int = Field(18, ge=11, le=23, description="ONNX opset version.")
    dynamic_batch: bool = Field(True, description="Export with a dynamic batch axis.")
    parity_atol: float = Field(
        1e-3,
        gt=0,
        le=1,
        description="Absolute part of the parity tolerance: max abs difference of logits allowed between PyTorch and onnxruntime, plus parity_rtol x the image's largest |logit|.",
    )
    parity_rtol: float = Field(
        1e-3,
        ge=0,
        le=1,
        description="Relative part of the parity tolerance: each logit may differ by parity_atol + parity_rtol x its image's largest |PyTorch logit|, so float32 rounding at large logits does not fail the gate; 0 for an absolute-only gate.",
    )
    parity_min_agreement: float = Field(
        0.99, ge=0, le=1, description="Minimum top-1 agreement between PyTorch and onnxruntime on a validation batch."
    )
    references: bool = Field(
        True,
        description="Also export the teacher and the unpruned KD student, so the bench measures speedup ratios against them in the same run.",
    )


MAX_BENCH_BATCH = 4096


class LatencyConfig(Section):
    """How a latency ratio is measured (bench/compare.py, docs/latency.md): both sides in alternating
    blocks, replicated over fresh processes; the ratio is the median over replicates with a 95% interval."""

    block_s: float = Field(
        0.05, gt=0, le=60, description="Seconds one side runs per block (the first calls of a block are not timed)."
    )
    blocks: int = Field(6, ge=2, le=1000, description="Blocks per side per replicate, order flipped every block.")
    min_replicates: int = Field(
        3,
        ge=2,
        le=1000,
        description="Fresh-process replicates before any stopping rule applies (2 is the least that gives an interval).",
    )
    max_replicates: int = Field(
        10, ge=2, le=1000, description="Stop after this many replicates even if an interval is still wide."
    )
    target_width: float = Field(
        0.10, gt=0, le=10, description="Stop when every interval's high / low - 1 is at most this."
    )
    budget_s: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="Stop adding replicates once the next one would end after this many seconds; the result says it stopped on budget.",
    )
    isolation: Literal["process", "session"] = Field(
        "process",
        description="process: a fresh Python per replicate (rounds inside one process agreed with each other and not with the next process: docs/latency.md); session: fresh sessions in this process (cheaper; the test suite uses it).",
    )

    @model_validator(mode="after")
    def _replicates_ordered(self) -> "LatencyConfig":
        if self.max_replicates < self.min_replicates:
            raise ValueError(f"max_replicates ({self.max_replicates}) is below min_replicates ({self.min_replicates})")
        return self


class BenchConfig(Section):
    providers: List[Literal["cpu", "cuda", "tensorrt"]] = Field(
        default_factory=lambda: ["cpu"],
        description="onnxruntime execution providers to benchmark; a requested one that is not active is an error.",
    )
    batch_sizes: List[int] = Field(
        default_factory=lambda: [1, 32], description=f"Batch sizes to measure, each 1 to {MAX_BENCH_BATCH}."
    )
    intra_op_threads: int = Field(
        0, ge=0, le=1024, description="onnxruntime intra-op threads (0: one per physical core)."
    )
    inter_op_threads: int = Field(1, ge=1, le=1024, description="onnxruntime inter-op threads.")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="onnxruntime graph optimisation level."
    )
    warmup: int = Field(10, ge=0, le=100000, description="Warm-up runs per input shape (not timed).")
    iterations: int = Field(200, ge=1, le=1000000, description="Max timed runs per batch size.")
    time_budget_s: float = Field(
        3.0,
        gt=0,
        le=3600,
        description="Max timed seconds per batch size (whichever of iterations / budget ends first).",
    )
    compare_torch: bool = Field(True, description="Also time PyTorch eager on the same model and batch.")
    latency: LatencyConfig = Field(
        # 0.25 s blocks: with 0.05 s the larger model of a pair stayed slow for more than the untimed
        # first calls after each switch, and the demo's student/final ratio at batch 32 read 3.64x
        # [3.32, 4.22] where an independent 0.25 s harness found 3.23x [3.05, 3.29]; with 0.25 s
        # blocks the stage measured 3.14x [3.01, 3.33] and the harness 3.35x [3.04, 3.45] (docs/latency.md)
        default_factory=lambda: LatencyConfig(block_s=0.25),
        description="How the ratio columns (vs teacher, vs student, vs float) and p50s are measured: replicated paired blocks with intervals (block_s 0.25 by default here).",
    )

    @field_validator("batch_sizes")
    @classmethod
    def _positive_batches(cls, v: List[int]) -> List[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("batch_sizes must be a non-empty list of integers >= 1")
        if max(v) > MAX_BENCH_BATCH:
            raise ValueError(
                f"batch size {max(v)} is above the maximum {MAX_BENCH_BATCH}; use batch sizes from 1 to "
                f"{MAX_BENCH_BATCH} (`python -m toolchain.bench MODEL.onnx --batch-sizes N` takes larger ones, bounded by memory)"
            )
        return v


class AutoQuantizeConfig(Section):
    images: int = Field(
        128,
        ge=8,
        le=10000,
        description="Calibration images on which each block's logits divergence is measured (its sensitivity).",
    )
    timed_blocks: int = Field(
        6,
        ge=1,
        le=64,
        description="How many of the most sensitive blocks get their float-fallback latency measured; only "
        "these may be kept in float.",
    )
    timing_budget_s: float = Field(
        30,
        gt=0,
        le=3600,
        description="Seconds the fallback comparison (all-INT8 against each timed block in float) may take.",
    )


def _qat_candidate(name: str) -> str:
    """A candidate quantization-aware training can start from: a plain QDQ file (the trainable module
    runs its graph), not the searched `auto` nor one whose wide convs moved to QGEMM."""
    from ..onnx.quantize import CANDIDATES

    _check_name(_quant_candidates, name)
    c = CANDIDATES.get(name)
    if c.format != "qdq" or c.search or c.gemm_min_weights:
        ok = [n for n in CANDIDATES.names() if _qat_ready(CANDIDATES.get(n))]
        raise ValueError(f"qat.candidate {name!r} is not a plain QDQ candidate; one of: {', '.join(ok)}")
    return name


def _qat_ready(c) -> bool:
    return c.format == "qdq" and not c.search and not c.gemm_min_weights


class QatConfig(TrainConfig):
    """Quantization-aware distillation (stages/qad.py): a QDQ candidate's own graph trained with fake
    quantization against the teacher, then gated like every INT8 candidate (docs/int8.md)."""

    when: Literal["on_miss", "always"] = Field(
        "on_miss",
        description="on_miss: train only when post-training INT8 shipped nothing; always: also when it did "
        "(the QAD file then replaces it only if it is more accurate or faster by measurement).",
    )
    candidate: str = Field(
        "qdq_u8s8_dw_per_channel_keep_stem_fold",
        description="The QDQ candidate whose layout and calibrated scales start the training (a plain QDQ "
        "candidate: not auto, not the _gemm ones). Default: the fastest plain layout on the demo (1.37x float at "
        "batch 32); all-INT8 per-tensor measured only 1.09x there (docs/int8.md, quantization-aware distillation).",
    )
    scales: Literal["learned", "frozen"] = Field(
        "learned",
        description="Activation scales trained with the weights (learned, in log space; zero points fixed) "
        "or kept at the calibration's values (frozen). Weight scales always follow the weights (max |w| / 127).",
    )
    parity_images: int = Field(
        256, ge=1, le=100000, description="Validation images on which fake-quant and onnxruntime outputs are compared."
    )
    epochs: int = Field(2, ge=1, le=10000, description="QAD epochs.")
    lr: float = Field(
        0.005,
        gt=0,
        le=10,
        description="Peak learning rate (a fraction of fine-tuning's: the start is already trained).",
    )
    schedule: Literal["onecycle", "cosine", "constant"] = Field("cosine", description="LR schedule, stepped per batch.")
    loss: str = Field("kd", description="Loss registry name (kd / dkd distil from the teacher; ce without one).")
    precision: Literal["fp32"] = Field(
        "fp32", description="fp32 only: bf16 would round differently from the INT8 arithmetic being simulated."
    )
    features: List[FeatureConfig] = Field(
        default_factory=list,
        max_length=0,
        description="Not available: the QDQ graph has no PyTorch module paths to hook.",
    )

    @field_validator("candidate")
    @classmethod
    def _plain_qdq(cls, v: str) -> str:
        return _qat_candidate(v)


class QuantizeConfig(Section):
    omitted_when_unset = ("max_file_bytes", "qat")

    candidates: List[str] = Field(
        default_factory=lambda: [
            "auto",
            "qdq_u8s8_dw_per_channel_keep_stem",
            "qdq_u8s8_dw_per_channel_keep_stem_fold",
            "qdq_u8s8_dw_per_channel_keep_stem_fold_gemm",
            "qdq_u8s8_dw_per_channel",
            "qdq_u8s8_dw_per_channel_gemm",
        ],
        min_length=1,
        max_length=16,
        description="INT8 formats to build and measure (`python -m toolchain list quantizers`); the stage ships the fastest "
        "one within max_accuracy_drop that is faster than float at every batch size.",
    )
    calibration_images: int = Field(
        512,
        ge=1,
        le=100000,
        description="Training images (evaluation preprocessing) that calibrate the activation ranges.",
    )
    max_accuracy_drop: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Largest validation-accuracy loss vs the float ONNX model a shipped INT8 model may have.",
    )
    min_speedup: float = Field(
        1.1,
        ge=1.0,
        le=100,
        description="A shipped INT8 model is at least this many times faster than float at every batch size: the lower end of its 95% interval over replicates clears it.",
    )
    max_file_bytes: Optional[int] = Field(
        None,
        ge=1,
        le=2**40,
        description="A file larger than this many bytes does not ship. When the float file is larger, the fastest INT8 candidate within max_accuracy_drop that fits ships even if it is not faster (the budget is size); when none fits, float ships and the stage says the limit is missed (or fails, on_miss: error). None: no limit; set from prune.budget.file_bytes when that budgets the INT8 file.",
    )
    on_miss: Literal["keep_float", "error"] = Field(
        "keep_float",
        description="No candidate passes the gate and is faster: ship the float model and say so (keep_float), or fail (error).",
    )
    batch_sizes: List[int] = Field(
        default_factory=lambda: [1, 32],
        description="Batch sizes at which a candidate must be faster than float (onnxruntime CPU p50, paired blocks over fresh-process replicates).",
    )
    latency: LatencyConfig = Field(
        default_factory=LatencyConfig,
        description="How each candidate is compared with float: replicated paired blocks; a candidate ships only where its interval's lower end clears min_speedup at every batch size.",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="onnxruntime intra-op threads of the latency measurement: the device's "
        "(0: one per physical core of this machine). INT8 convolutions scale worse with threads than float "
        "ones (onnxruntime runs a batch's images one after the other), so the choice can differ by thread count.",
    )
    search_budget_s: float = Field(
        600,
        gt=0,
        le=86400,
        description="Stop building new candidates after this many seconds (the ones built are still measured).",
    )
    auto: AutoQuantizeConfig = Field(
        default_factory=AutoQuantizeConfig,
        description="The `auto` candidate: blocks kept in float by their measured sensitivity and "
        "fallback latency (docs/int8.md, 'INT8 layer by layer').",
    )
    # key False: the post-training candidates do not depend on it; the qad stage keys on it (fingerprint)
    qat: Optional[QatConfig] = Field(
        None,
        json_schema_extra={"key": False},
        description="Quantization-aware distillation after post-training INT8 (the qad stage); None: off.",
    )

    @field_validator("candidates")
    @classmethod
    def _known_candidates(cls, v: List[str]) -> List[str]:
        for name in v:
            _check_name(_quant_candidates, name)
        if len(set(v)) != len(v):
            raise ValueError("candidates: each name once")
        return v

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: List[int]) -> List[int]:
        if not v or any(b < 1 or b > 4096 for b in v):
            raise ValueError("batch_sizes must be a non-empty list of integers from 1 to 4096")
        return v


class PackageConfig(Section):
    target_platform: Literal["amd64", "arm"] = Field(
        "amd64",
        description="CPU family of the device: the ORT-format files are optimised for it (amd64: x86-64, may use x86-only NCHWc layout nodes; arm: ARM CPUs, without them).",
    )
    golden_images: int = Field(
        4,
        ge=1,
        le=64,
        description="Test images shipped as golden PNG files with their model inputs and outputs, which the package is checked against before it ships.",
    )
