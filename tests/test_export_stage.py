from toolchain.bench.compare import Plan, compare


def test_replicates_merge_to_the_median_of_their_medians():
    """A stage's p50 is the median over replicates of each replicate's median; the tails pool every call."""
    medians = iter([1.0, 9.0, 2.0])

    def replicate(spec):
        m = next(medians)
        return {"ratios": {}, "medians_ms": {"a@1": m}, "times": {"a@1": [m / 1e3] * 10}, "shapes": {"a@1": [1, 3]}}

    c = compare({"a": "a.onnx"}, [], [1], plan=Plan(min_replicates=3), replicate=replicate)
    row = c.stats("a")[0]
    assert row["p50_ms"] == 2.0 and row["iterations"] == 30 and row["p99_ms"] > 8.9 and len(c.replicates) == 3
