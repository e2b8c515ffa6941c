from toolchain.bench.ort import STAT_KEYS
from toolchain.bench.interleave import median_of_rounds as _median_of_rounds


def round_with(p50):
    row = {"provider": "cpu", "batch_size": 1, "iterations": 10, **{k: p50 for k in STAT_KEYS}}
    return {"results": [row], "environment": {}}


def test_rounds_merge_to_per_row_medians():
    merged = _median_of_rounds([round_with(1.0), round_with(9.0), round_with(2.0)])
    row = merged["results"][0]
    assert row["p50_ms"] == 2.0 and row["iterations"] == 30 and merged["environment"]["rounds"] == 3
