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
   divergence (the MSE of logits: cheap, and it ranks what the accuracy then confirms: the
   ACCURACY_CHECKED most sensitive blocks' files also get their validation accuracy).
2. Fallback cost, measured, not assumed: a float block between INT8 neighbours runs its float
   kernel and adds Quantize/Dequantize conversions, and a narrow INT8 kernel can be slower than
   the float one (MLAS's depthwise, the 3-channel stem), so the cost can be of either sign. Two
   sets of blocks are timed: the most sensitive ones (when all-INT8 misses the accuracy gate) and
   the ones whose INT8 kernels onnxruntime's per-node profile shows slower than their float kernels
   (bench/profile.py; names mapped back by profile_gains). A float block fed by an INT8 activation
   gets its own per-axis DequantizeLinear (float_fallback.py) so onnxruntime runs its float kernel;
   where that cannot be done (one input channel) onnxruntime quantizes it anyway (graph.runtime_int8)
   and it has no float kernel: it is never timed for the profile's promise of a faster one; as a
   sensitive block its file is a real alternative (onnxruntime's weights instead of the candidate's),
   measured like any other and labelled runs_int8.
   bench/compare.py times all-INT8 against all-INT8-with-that-block-float, paired blocks in fresh
   processes; cost = p50(with the block float) / p50(all-INT8) - 1, the geometric mean over the
   batch sizes.
3. Choice: every timed block whose fallback is measured faster at some batch size and slower at
   none (intervals) is kept float (it only adds accuracy). Then, while validation accuracy is outside
   max_drop of float, the shared greedy (toolchain/greedy.py, the allocator `prune.budget` runs too)
   keeps the timed sensitive block with the least measured cost per unit of sensitivity float (a
   free one first), checking accuracy after each. When they run out first, the last set is the
   candidate and the stage's gate rejects it for its accuracy.
The file chosen is then one candidate among the whole-model ones: the stage measures it against
float like any other, and it ships only if it wins there.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..greedy import Move, greedy

BLOCK_OPS = ("Conv", "Gemm", "MatMul", "Add")
ACCURACY_CHECKED = 3  # the most sensitive blocks whose only-it-float file also gets its validation accuracy
REVISION = 5  # in the quantize stage key: a changed search rebuilds cached `auto` candidates (2: free = faster
# somewhere, slower nowhere; 3: the top blocks' validation accuracy alone in float; 4: names the kept-float
# blocks onnxruntime runs in INT8 all the same; 5: does not time those for a faster float kernel)


@dataclass
class Block:
    name: str  # the ONNX node name (what nodes_to_exclude takes)
    op: str
    divergence: Optional[float] = None  # logits' relative MSE with only this block in float
    sensitivity: Optional[float] = None  # base divergence - divergence: what keeping it float buys
    cost: Optional[float] = None  # measured slowdown of keeping it float (negative: faster)
    cost_interval: Optional[Dict[str, List[float]]] = None  # batch -> [ratio, low, high] of base / with it float
    val_accuracy: Optional[float] = None  # of the candidate after this block was added (choice steps only)
    alone_val_accuracy: Optional[float] = None  # with only this block in float (the ACCURACY_CHECKED most sensitive)
    profile_gain: Optional[float] = None  # profiled INT8 minus float kernel time, as a share of the INT8 model's
    kept_float: bool = False
    # float in its file, but fed by an INT8 activation, so onnxruntime quantizes its weights and runs it
    # in INT8 all the same (graph.runtime_int8): no float kernel to gain speed from
    runs_int8: bool = False

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
    # kept float in the file, run in INT8 by onnxruntime all the same (graph.runtime_int8)
    runs_int8: List[str] = field(default_factory=list)

    def table(self) -> List[Dict[str, object]]:
        return [b.as_dict() for b in self.blocks]

    def line(self) -> str:
        kept = ", ".join(self.kept_float) or "none"
        runs = f" (onnxruntime runs {', '.join(self.runs_int8)} in INT8 all the same)" if self.runs_int8 else ""
        return (
            f"auto: {len(self.blocks)} blocks ranked; kept in float: {kept}{runs}; val acc {self.val_accuracy:.4f} "
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


ACTIVATIONS = ("Clip", "Relu", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid")


def profile_gains(pre_path: Path, float_nodes: List[dict], int8_nodes: List[dict]) -> Dict[str, float]:
    """block -> its INT8 kernel time minus its float kernel time (us), from onnxruntime per-node profiles
    (bench/profile.py) of the all-INT8 file and the float file. onnxruntime renames what it runs: a fused
    float conv is named after the tensor it writes (`<tensor>_nchwc`, the activation's output when one
    is fused), an INT8 node `<node>_token_<n>`; both are mapped back to the block they come from."""
    import onnx

    graph = onnx.load(str(pre_path), load_external_data=False).graph
    names = {n.name for n in graph.node if n.op_type in BLOCK_OPS}
    writer = {o: n.name for n in graph.node if n.name in names for o in n.output}
    for n in graph.node:  # an activation fused into the block writes the tensor the fused node is named after
        if n.op_type in ACTIVATIONS and n.input and n.input[0] in writer:
            writer[n.output[0]] = writer[n.input[0]]

    def block_of(node: str) -> Optional[str]:
        base = re.sub(r"_nchwc$", "", re.sub(r"_token_\d+$", "", node))
        return base if base in names else writer.get(base)

    totals: Dict[str, Dict[str, float]] = {"float": {}, "int8": {}}
    for kind, nodes in (("float", float_nodes), ("int8", int8_nodes)):
        for node in nodes:
            block = block_of(node["name"])
            if block is not None:
                totals[kind][block] = totals[kind].get(block, 0.0) + node["us"]
    return {b: us - totals["float"].get(b, 0.0) for b, us in totals["int8"].items()}


def faster_in_float(block: Block) -> bool:
    """Its measured fallback is faster at some batch size and slower at none: one interval of
    all-INT8 / with it float lies above 1, none below 1 (a slow INT8 kernel, e.g. the 3-channel stem)."""
    intervals = list((block.cost_interval or {}).values())
    return any(low > 1.0 for _, low, _ in intervals) and all(high >= 1.0 for _, _, high in intervals)


@dataclass
class BlockSearch:
    """The three steps of the module doc, over callables the quantize stage supplies:
    build(float_blocks, path) writes the candidate with those blocks in float and returns the ones
    onnxruntime runs in INT8 all the same (None: none); logits_of(path)
    runs the calibration images; accuracy_of(path) is validation accuracy; time_fallbacks(base,
    {name: path}) returns {name: (cost, {batch: [ratio, low, high]})} from one comparison."""

    build: Callable[[Sequence[str], Path], Optional[Sequence[str]]]
    logits_of: Callable[[Path], np.ndarray]
    accuracy_of: Callable[[Path], float]
    time_fallbacks: Callable[[Path, Dict[str, Path]], Dict[str, Tuple[float, Dict[str, List[float]]]]]
    work: Path
    progress: Callable[[str], None] = lambda line: None
    # all-INT8 file -> block -> profiled INT8 minus float kernel time (> 0: the fallback may be free)
    profile: Optional[Callable[[Path], Dict[str, float]]] = None

    def rank(self, found: List[Block], float_logits: np.ndarray) -> Tuple[float, List[Block], Path]:
        base = self.work / "base.onnx"
        self.build([], base)
        base_div = divergence(float_logits, self.logits_of(base))
        for i, block in enumerate(found, 1):
            path = self._path(block)
            block.runs_int8 = block.name in (self.build([block.name], path) or ())
            block.divergence = divergence(float_logits, self.logits_of(path))
            block.sensitivity = base_div - block.divergence
            path.unlink()  # one model file per block would stay in the stage cache; the few used later are rebuilt
            if i % 10 == 0 or i == len(found):
                self.progress(f"sensitivity: {i}/{len(found)} blocks")
        return base_div, sorted(found, key=lambda b: -(b.sensitivity or 0.0)), base

    def run(
        self, found: List[Block], float_logits: np.ndarray, float_val: float, max_drop: float, timed: int
    ) -> Tuple[SearchResult, Path]:
        """The chosen candidate's file (work/auto.onnx) and what was measured on the way."""
        base_div, ranked, base = self.rank(found, float_logits)
        base_val = self.accuracy_of(base)
        for block in ranked[:ACCURACY_CHECKED]:  # the divergence ranks; accuracy confirms the top of it
            block.alone_val_accuracy = self.accuracy_of(self._file(block))
        within = lambda val: float_val - val <= max_drop + 1e-9  # noqa: E731  (the gate's own rule)
        sensitive = [] if within(base_val) else [b for b in ranked[:timed] if (b.sensitivity or 0.0) > 0]
        gains = self.profile(base) if self.profile is not None else {}
        for block in ranked:
            block.profile_gain = gains.get(block.name)
        # a block onnxruntime runs in INT8 anyway has no float kernel to gain: the profile's promise is void
        faster = (b for b in ranked if gains.get(b.name, 0.0) > 0 and not b.runs_int8)
        slow = sorted(faster, key=lambda b: -gains[b.name])[:timed]
        to_time = list({b.name: b for b in [*sensitive, *slow]}.values())
        if to_time:
            self.progress(
                f"timing the float fallback of {len(to_time)} blocks against all-INT8 ({len(sensitive)} most "
                f"sensitive, {len(slow)} profiled slower in INT8)"
            )
            for name, (cost, interval) in self.time_fallbacks(base, {b.name: self._file(b) for b in to_time}).items():
                block = next(b for b in to_time if b.name == name)
                block.cost, block.cost_interval = cost, interval
        out = self.work / "auto.onnx"
        chosen = [b for b in sorted(to_time, key=lambda b: b.cost or 0.0) if faster_in_float(b)]  # free: take all
        runs = self.build([b.name for b in chosen], out)
        val = self.accuracy_of(out) if chosen else base_val
        for block in chosen:
            block.kept_float = True
        if chosen:
            self.progress(f"kept {len(chosen)} blocks float that run faster in float: val acc {val:.4f}")
        state = {"val": val, "runs": runs}

        def moves():  # only a timed block is a choice: its price is its measured cost
            return (Move(b, b.sensitivity, b.cost) for b in sensitive if not b.kept_float and b.cost is not None)

        def take(move: Move) -> None:
            block = move.key
            chosen.append(block)
            state["runs"] = self.build([b.name for b in chosen], out)
            state["val"] = block.val_accuracy = self.accuracy_of(out)
            block.kept_float = True
            self.progress(f"kept {block.name} in float: val acc {state['val']:.4f}")

        greedy(moves, take, lambda: within(state["val"]))
        val, runs = state["val"], state["runs"]
        for block in ranked:
            self._path(block).unlink(missing_ok=True)
        result = SearchResult(base_div, base_val, [b.name for b in chosen], val, within(val), ranked, list(runs or ()))
        return result, out

    def _file(self, block: Block) -> Path:
        """The file with only `block` in float, built again (same calibration) if the ranking removed it."""
        path = self._path(block)
        if not path.is_file():
            self.build([block.name], path)
        return path

    def _path(self, block: Block) -> Path:
        return self.work / ("float_" + re.sub(r"[^\w.-]", "_", block.name).strip("_") + ".onnx")


# ---------------------------------------------------------------- the search on real files


def search(
    pre: Path,
    out_path: Path,
    candidate,
    reader,
    reduce_range: bool,
    accuracy_of: Callable[[Path], float],
    float_val: float,
    cfg,
    settings,
    plan,
    work: Path,
    progress: Callable[[str], None] = lambda line: None,
) -> Dict[str, object]:
    """Run BlockSearch on the pre-processed float file `pre` and write the chosen candidate to out_path;
    returns quantize()'s info with the per-block table under "auto". cfg: a quantize section (its
    batch_sizes, max_accuracy_drop, auto.*); settings, plan: how bench/compare.py times (the section's)."""
    import shutil

    from ..bench.ort import create_session
    from .quantize import quantize

    work.mkdir(parents=True, exist_ok=True)
    cache = work / "calibration.json"
    cache.unlink(missing_ok=True)  # the ranges of this calibration only
    images = first_images(reader, cfg.auto.images)
    built: Dict[Path, Dict[str, object]] = {}  # each file's quantize() info, as last built

    def build(float_blocks: Sequence[str], out: Path) -> List[str]:
        built[out] = quantize(pre, out, candidate, reader, reduce_range, float_blocks, cache)
        return [n for n in float_blocks if n in built[out]["float_nodes_run_int8"]]

    def logits_of(path: Path) -> np.ndarray:
        session = create_session(path, "cpu")
        name = session.get_inputs()[0].name
        return np.concatenate([session.run(None, {name: x})[0] for x in images])

    searcher = BlockSearch(
        build,
        logits_of,
        accuracy_of,
        lambda base, files: time_fallbacks(base, files, cfg.batch_sizes, settings, plan, cfg.auto.timing_budget_s),
        work,
        progress=progress,
        profile=lambda base: profiled_gains(pre, base, cfg.batch_sizes, settings),
    )
    result, chosen = searcher.run(blocks(pre), logits_of(pre), float_val, cfg.max_accuracy_drop, cfg.auto.timed_blocks)
    info = built[chosen]
    progress(result.line().removeprefix("auto: "))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(chosen, out_path)
    fields = {
        "line": result.line(),
        "base_divergence": result.base_divergence,
        "base_val_accuracy": result.base_val_accuracy,
        "val_accuracy": result.val_accuracy,
        "within_gate": result.within_gate,
        "kept_float": result.kept_float,
        "kept_float_runs_int8": result.runs_int8,
        "blocks": result.table(),
    }
    return {**info, "excluded_nodes": result.kept_float, "auto": fields}


def first_images(reader, n: int) -> List[np.ndarray]:
    """The first n calibration images, in the reader's chunks (the sensitivity measurement's inputs)."""
    reader.rewind()
    chunks, count = [], 0
    while count < n and (chunk := reader.get_next()) is not None:
        x = next(iter(chunk.values()))[: n - count]
        chunks.append(x)
        count += len(x)
    reader.rewind()
    return chunks


def profiled_gains(float_path: Path, int8_path: Path, batch_sizes: Sequence[int], settings) -> Dict[str, float]:
    """block -> its INT8 kernel time minus its float kernel time in onnxruntime's per-node profile, as a
    share of the INT8 model's profiled time, summed over the batch sizes (it picks which fallbacks to time)."""
    from ..bench.profile import node_profile

    gains: Dict[str, float] = {}
    for batch in batch_sizes:
        fp = node_profile(float_path, batch_size=batch, settings=settings, runs=20, replicates=1)
        qp = node_profile(int8_path, batch_size=batch, settings=settings, runs=20, replicates=1)
        for name, us in profile_gains(float_path, fp["nodes"], qp["nodes"]).items():
            gains[name] = gains.get(name, 0.0) + us / max(qp["total_us"], 1e-9)
    return gains


def time_fallbacks(
    base: Path, files: Dict[str, Path], batch_sizes: Sequence[int], settings, plan, budget_s: float
) -> Dict[str, Tuple[float, Dict[str, List[float]]]]:
    """block -> (cost, batch -> [ratio, low, high]): all-INT8 against each block in float, paired in one
    comparison; cost = p50 with the block float / p50 all-INT8 - 1 (geometric mean over batch sizes)."""
    from dataclasses import replace

    from ..bench.compare import compare

    roles = {f"block{i}": name for i, name in enumerate(files)}
    comparison = compare(
        {"int8": base, **{role: files[name] for role, name in roles.items()}},
        [("int8", role) for role in roles],
        batch_sizes,
        settings,
        replace(plan, budget_s=budget_s),
    )
    out = {}
    for role, name in roles.items():
        ivs = {b: comparison.ratio("int8", role, b) for b in batch_sizes}
        cost = float(np.exp(np.mean([-np.log(iv.ratio) for iv in ivs.values()]))) - 1
        out[name] = (cost, {str(b): [iv.ratio, iv.low, iv.high] for b, iv in ivs.items()})
    return out
