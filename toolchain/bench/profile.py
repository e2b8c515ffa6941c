"""Per-node latency from onnxruntime's own profiler, aggregated over fresh sessions. Torch-free.

    node_profile(onnx_path, batch_size=1, settings=Settings(), runs=100, replicates=3) -> dict
        {"nodes": [{"name", "op_type", "us", "share"}, ...] slowest first, "op_types": {op: us},
         "total_us", "batch_size", "runs", "replicates", "settings"}
        us: per replicate the median kernel time of each node over `runs` calls, then the median over
        replicates; op_types sums those per op type. Nodes are those of the optimised graph
        onnxruntime runs (fused Conv+Relu, NCHWc reorders...), not of the file.

The profiler adds overhead per node, so the sum is not a latency to claim (bench/compare.py
measures those); it says where the time goes, which is what a per-layer budget or an INT8
placement needs.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

from .compare import Settings
from .ort import _check_model_file, _graph_opt_level, _ort, make_input, model_input, resolve_input_shape


def _profiled_session(path: Path, s: Settings, prefix: str):
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = s.intra_op_threads, s.inter_op_threads
    opts.graph_optimization_level = _graph_opt_level(ort, s.graph_optimization)
    opts.log_severity_level = 3
    opts.enable_profiling, opts.profile_file_prefix = True, prefix
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _one_replicate(path: Path, batch_size: int, s: Settings, runs: int, work: str) -> Dict[str, tuple]:
    """node name -> (op type, median kernel us) over `runs` calls of one fresh session."""
    session = _profiled_session(path, s, os.path.join(work, "profile"))
    inp = model_input(session)
    feed = {inp["name"]: make_input(resolve_input_shape(inp["shape"], batch_size), inp["dtype"])}
    for _ in range(runs):
        session.run(None, feed)
    trace = session.end_profiling()
    per_node: Dict[str, List[float]] = defaultdict(list)
    op_of: Dict[str, str] = {}
    with open(trace) as f:
        for event in json.load(f):
            if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
                name = event["name"][: -len("_kernel_time")]
                per_node[name].append(float(event["dur"]))
                op_of[name] = event.get("args", {}).get("op_name", "?")
    os.remove(trace)
    return {n: (op_of[n], statistics.median(v)) for n, v in per_node.items()}


def node_profile(
    onnx_path, batch_size: int = 1, settings: Optional[Settings] = None, runs: int = 100, replicates: int = 3
) -> Dict[str, Any]:
    settings = settings or Settings()
    path = _check_model_file(onnx_path)
    with tempfile.TemporaryDirectory(prefix="toolchain-profile-") as work:
        reps = [_one_replicate(path, batch_size, settings, runs, work) for _ in range(replicates)]
    names = list(dict.fromkeys(n for r in reps for n in r))
    nodes = [
        {
            "name": n,
            "op_type": next(r[n][0] for r in reps if n in r),
            "us": statistics.median(r[n][1] for r in reps if n in r),
        }
        for n in names
    ]
    nodes.sort(key=lambda row: -row["us"])
    total = sum(row["us"] for row in nodes)
    for row in nodes:
        row["share"] = row["us"] / total if total else 0.0
    op_types: Dict[str, float] = defaultdict(float)
    for row in nodes:
        op_types[row["op_type"]] += row["us"]
    return {
        "nodes": nodes,
        "op_types": dict(sorted(op_types.items(), key=lambda kv: -kv[1])),
        "total_us": total,
        "batch_size": batch_size,
        "runs": runs,
        "replicates": replicates,
        "settings": asdict(settings),
    }


def format_profile(profile: Dict[str, Any], top: int = 10) -> str:
    lines = [
        f"per-node profile, batch {profile['batch_size']}, {profile['replicates']} sessions x {profile['runs']} runs "
        f"(us, median; profiler overhead included)"
    ]
    lines += [f"  {op:<24} {us:>10.1f}  {us / profile['total_us']:>6.1%}" for op, us in profile["op_types"].items()]
    lines.append(f"  slowest {min(top, len(profile['nodes']))} nodes:")
    lines += [f"  {n['name'][:40]:<40} {n['op_type']:<16} {n['us']:>9.1f}" for n in profile["nodes"][:top]]
    return "\n".join(lines)
