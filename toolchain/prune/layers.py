"""Per-layer before/after records (logged as an artifact) and the achieved sparsity."""

from __future__ import annotations

from typing import Dict, List

import torch.nn as nn

from .targets import in_channels, out_channels


def snapshot(model: nn.Module, names: List[str]) -> Dict[str, Dict]:
    """Shape and nonzero count of each named layer's weight (layers are looked up
    by name: speedup replaces the module objects but keeps their names)."""
    out = {}
    for name in names:
        module = model.get_submodule(name)
        out[name] = {
            "type": type(module).__name__,
            "in": in_channels(module),
            "out": out_channels(module),
            "numel": module.weight.numel(),
            "nonzero": int(module.weight.count_nonzero()),
        }
    return out


def compare(method: str, before: Dict[str, Dict], after: Dict[str, Dict]) -> List[Dict]:
    rows = []
    for name, b in before.items():
        a = after[name]
        row = {"name": name, "type": b["type"]}
        if method == "channel":
            row.update(in_before=b["in"], in_after=a["in"], out_before=b["out"], out_after=a["out"])
            row["pruned"] = a["out"] < b["out"] or a["in"] < b["in"]
        else:
            row.update(numel=b["numel"], nonzero_before=b["nonzero"], nonzero_after=a["nonzero"])
            row["sparsity"] = round(1.0 - a["nonzero"] / b["numel"], 6)
            row["pruned"] = a["nonzero"] < b["nonzero"]
        rows.append(row)
    return rows


def achieved_sparsity(method: str, rows: List[Dict]) -> float:
    """weight: 1 - nonzero/numel over the selected layers' weights;
    channel: fraction of output channels removed over the selected layers."""
    if method == "channel":
        total = sum(r["out_before"] for r in rows)
        return 1.0 - sum(r["out_after"] for r in rows) / total if total else 0.0
    total = sum(r["numel"] for r in rows)
    return 1.0 - sum(r["nonzero_after"] for r in rows) / total if total else 0.0


def unaligned(rows: List[Dict], align: int) -> int:
    """Pruned layers whose kept output channels are not a multiple of `align`."""
    return sum(1 for r in rows if r["out_after"] < r["out_before"] and r["out_after"] % align)
