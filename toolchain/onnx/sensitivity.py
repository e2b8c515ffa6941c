"""INT8 layer by layer: which blocks to keep in float, by their measured accuracy and latency cost.

    search = BlockSearch(build, logits_of, accuracy_of, time_fallbacks)
    result = search.run(blocks(pre_path), images, float_val, max_drop, timed)

What the `auto` quantization candidate does (issue 32), on the real runtime:
1. Sensitivity. `base` is the candidate with every quantizable block in INT8 (a Conv with the
   activation onnxruntime fuses into it, an Add, the Gemm/MatMul classifier). For each block,
   the same candidate with only that block in float. Every file comes from one calibration
   (onnxruntime's calibration cache) and runs in onnxruntime on the calibration images; a file's
   divergence is its logits' mean squared error against the float model's, relative to the float
   logits' variance. A block's sensitivity is how much keeping it in float lowers the base's
   divergence (the MSE of logits: cheap, and it ranks what the accuracy then confirms).
2. Fallback cost, measured, not assumed: a float block between INT8 neighbours runs its float
   kernel and adds Quantize/Dequantize conversions, and a narrow INT8 kernel can be slower than
   the float one (MLAS's depthwise), so the cost can be of either sign. For the `timed` most
   sensitive blocks, bench/compare.py times base against base-with-that-block-float (paired
   blocks, fresh processes); cost = p50(with the block float) / p50(base) - 1, the geometric mean
   over the batch sizes.
3. Choice: starting from base, add blocks in order of sensitivity per unit of cost (a block that
   costs nothing or speeds up comes first), checking validation accuracy after each, and stop
   as soon as it is within max_drop of float; the set is then final. When the ranked blocks run
   out first, the last set is the candidate and the stage's gate rejects it for its accuracy.
The file chosen is then one candidate among the whole-model ones: the stage measures it against
float like any other, and it ships only if it wins there.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

BLOCK_OPS = ("Conv", "Gemm", "MatMul", "Add")


@dataclass
class Block:
    name: str  # the ONNX node name (what nodes_to_exclude takes)
    op: str
    divergence: Optional[float] = None  # logits' relative MSE with only this block in float
    sensitivity: Optional[float] = None  # base divergence - divergence: what keeping it float buys
    cost: Optional[float] = None  # measured slowdown of keeping it float (negative: faster)
    cost_interval: Optional[Dict[str, List[float]]] = None  # batch -> [ratio, low, high] of base / with it float
    val_accuracy: Optional[float] = None  # of the candidate after this block was added (choice steps only)
    kept_float: bool = False

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


@dataclass
class SearchResult:
    base_divergence: float
    base_val_accuracy: float
    kept_float: List[str]
    val_accuracy: float
    within_gate: bool
    blocks: List[Block]  # every ranked block, most sensitive first

    def table(self) -> List[Dict[str, object]]:
        return [b.as_dict() for b in self.blocks]

    def line(self) -> str:
        kept = ", ".join(self.kept_float) or "none"
        return (
            f"auto: {len(self.blocks)} blocks ranked; kept in float: {kept}; val acc {self.val_accuracy:.4f} "
            f"(all INT8: {self.base_val_accuracy:.4f}){'' if self.within_gate else ', NOT within the accuracy gate'}"
        )


def blocks(pre_path: Path) -> List[Block]:
    """The quantizable blocks of the (pre-processed) float graph, in graph order."""
    import onnx

    graph = onnx.load(str(pre_path), load_external_data=False).graph
    return [Block(n.name, n.op_type) for n in graph.node if n.op_type in BLOCK_OPS and n.name]


def divergence(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean squared error of logits, relative to the reference logits' variance (scale-free)."""
    ref = reference.astype(np.float64)
    return float(np.mean((logits.astype(np.float64) - ref) ** 2) / max(np.var(ref), 1e-12))


def priority(block: Block) -> float:
    """Sensitivity per unit of measured cost; a free (or speeding-up) fallback first, by sensitivity."""
    sens = max(block.sensitivity or 0.0, 0.0)
    if block.cost is None:
        return -math.inf  # not timed: not a choice
    if block.cost <= 0:
        return 1e12 + sens
    return sens / block.cost


@dataclass
class BlockSearch:
    """The three steps of the module doc, over callables the quantize stage supplies:
    build(float_blocks, path) writes the candidate with those blocks in float; logits_of(path)
    runs the calibration images; accuracy_of(path) is validation accuracy; time_fallbacks(base,
    {name: path}) returns {name: (cost, {batch: [ratio, low, high]})} from one comparison."""

    build: Callable[[Sequence[str], Path], None]
    logits_of: Callable[[Path], np.ndarray]
    accuracy_of: Callable[[Path], float]
    time_fallbacks: Callable[[Path, Dict[str, Path]], Dict[str, Tuple[float, Dict[str, List[float]]]]]
    work: Path
    progress: Callable[[str], None] = lambda line: None

    def rank(self, found: List[Block], float_logits: np.ndarray) -> Tuple[float, List[Block], Path]:
        base = self.work / "base.onnx"
        self.build([], base)
        base_div = divergence(float_logits, self.logits_of(base))
        for i, block in enumerate(found, 1):
            path = self._path(block)
            self.build([block.name], path)
            block.divergence = divergence(float_logits, self.logits_of(path))
            block.sensitivity = base_div - block.divergence
            if i % 10 == 0 or i == len(found):
                self.progress(f"sensitivity: {i}/{len(found)} blocks")
        return base_div, sorted(found, key=lambda b: -(b.sensitivity or 0.0)), base

    def run(
        self, found: List[Block], float_logits: np.ndarray, float_val: float, max_drop: float, timed: int
    ) -> Tuple[SearchResult, Path]:
        """The chosen candidate's file (work/auto.onnx) and what was measured on the way."""
        base_div, ranked, base = self.rank(found, float_logits)
        base_val = self.accuracy_of(base)
        top = [b for b in ranked[:timed] if (b.sensitivity or 0.0) > 0]
        if float_val - base_val > max_drop + 1e-9 and top:
            self.progress(f"timing the float fallback of the {len(top)} most sensitive blocks against all-INT8")
            for name, (cost, interval) in self.time_fallbacks(base, {b.name: self._path(b) for b in top}).items():
                block = next(b for b in top if b.name == name)
                block.cost, block.cost_interval = cost, interval
        chosen, val, out = [], base_val, self.work / "auto.onnx"
        self.build([], out)
        for block in sorted(top, key=priority, reverse=True):
            if float_val - val <= max_drop + 1e-9 or block.cost is None:
                break
            chosen.append(block.name)
            self.build(chosen, out)
            val = block.val_accuracy = self.accuracy_of(out)
            block.kept_float = True
            self.progress(f"kept {block.name} in float: val acc {val:.4f}")
        result = SearchResult(base_div, base_val, chosen, val, float_val - val <= max_drop + 1e-9, ranked)
        return result, out

    def _path(self, block: Block) -> Path:
        return self.work / ("float_" + re.sub(r"[^\w.-]", "_", block.name).strip("_") + ".onnx")
