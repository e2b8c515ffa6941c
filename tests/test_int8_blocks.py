"""INT8 layer by layer (the `auto` candidate, onnx/sensitivity.py): the block whose INT8 breaks the
model ranks first on the real runtime; the choice weighs sensitivity against measured fallback cost;
the stage ships the searched file only through the same gate, and says why in the card."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import tiny_dw_model

from toolchain.cli import run
from toolchain.onnx.graph import runtime_int8
from toolchain.onnx.quantize import CANDIDATES, CalibrationReader, preprocess, quantize
from toolchain.onnx.sensitivity import Block, BlockSearch, blocks, divergence


def _fragile(path: Path) -> Path:
    """The tiny mobilenet-like graph with pw1 made fragile: one weight 1000x the others, on an input
    channel the depthwise conv zeroes (so the function and the activation ranges do not change), which
    makes pw1's per-tensor weight scale so coarse that its other weights quantize to zero."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(tiny_dw_model(path)))
    inits = {i.name: i for i in model.graph.initializer}
    for name, edit in (
        ("dw_w", lambda w: w.__setitem__(3, 0.0)),
        ("dw_w_b", lambda w: w.__setitem__(3, 0.0)),
        ("pw1_w", lambda w: w.__setitem__((5, 3), 300.0)),
    ):
        w = numpy_helper.to_array(inits[name]).copy()
        edit(w)
        inits[name].CopyFrom(numpy_helper.from_array(w, name))
    onnx.save(model, str(path))
    return path


def _session_logits(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_the_block_made_fragile_on_purpose_ranks_first(tmp_path):
    pre = tmp_path / "pre.onnx"
    preprocess(_fragile(tmp_path / "float.onnx"), pre)
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, (32, 3, 16, 16)).astype(np.float32)
    reader = CalibrationReader([(x, np.zeros(32))], "input", 32)
    auto, cache = CANDIDATES.get("auto"), tmp_path / "calibration.json"

    def build(float_blocks, out):
        info = quantize(pre, out, auto, reader, float_nodes=float_blocks, calibration_cache=cache)
        return [n for n in float_blocks if n in info["float_nodes_run_int8"]]

    search = BlockSearch(build, lambda p: _session_logits(p, x), None, None, tmp_path)
    found = blocks(pre)
    assert {b.name for b in found} >= {"stem", "dw", "pw1", "pw2", "fc"}
    base_div, ranked, _ = search.rank(found, _session_logits(pre, x))
    assert ranked[0].name == "pw1", [(b.name, b.sensitivity) for b in ranked]
    # measured: pw1 0.14 of the base's 0.23, the next block (pw2) 0.005
    assert ranked[0].sensitivity > 0.5 * base_div and ranked[0].sensitivity > 10 * ranked[1].sensitivity
    assert cache.is_file()  # one calibration for every file
    # pw1 follows the INT8 depthwise activation: its own per-axis DequantizeLinear keeps it float in
    # onnxruntime too (float_fallback.py), so no ranked block runs in INT8 behind the file's back
    assert not any(b.runs_int8 for b in ranked)


class Synthetic:
    """Blocks with known damage and cost: accuracy = 0.90 - the damage of the blocks left in INT8."""

    damage = {"a": 0.20, "b": 0.003, "c": 0.004, "d": 0.0}
    cost = {"a": 0.30, "b": -0.05, "c": 0.20, "d": 0.02}
    runs_int8: frozenset = frozenset()  # float in the file, INT8 in onnxruntime all the same

    def build(self, float_blocks, out: Path):
        out.write_text(json.dumps(sorted(float_blocks)))
        return [b for b in float_blocks if b in self.runs_int8]

    def logits_of(self, path: Path):
        kept = set(json.loads(path.read_text())) if path.name != "float.onnx" else set(self.damage)
        return np.array([[1.0 + sum(self.damage[b] for b in self.damage if b not in kept), 0.0]])

    def accuracy_of(self, path: Path):
        kept = set(json.loads(path.read_text()))
        return 0.90 - sum(v for b, v in self.damage.items() if b not in kept)

    def time_fallbacks(self, base, files):
        return {n: (self.cost[n], {"1": [1 / (1 + self.cost[n])] * 3}) for n in files}


def test_the_choice_takes_free_fallbacks_first_then_sensitivity_per_cost_and_stops_at_the_gate(tmp_path):
    s = Synthetic()
    search = BlockSearch(s.build, s.logits_of, s.accuracy_of, s.time_fallbacks, tmp_path)
    (tmp_path / "float.onnx").write_text("[]")
    found = [Block(n, "Conv") for n in "abcd"]
    result, out = search.run(found, s.logits_of(tmp_path / "float.onnx"), 0.90, 0.01, timed=3)
    assert [b.name for b in result.blocks][:3] == ["a", "c", "b"]  # by sensitivity
    # the known optimum: within the gate (damage left <= 0.01) at the least cost is {a, b}: b speeds up
    # when float (taken first, free), a is needed; c is not (its 0.004 fits the gate) and costs 0.20
    assert result.kept_float == ["b", "a"]
    assert result.within_gate and result.val_accuracy == pytest.approx(0.90 - 0.004)
    assert json.loads(out.read_text()) == ["a", "b"]  # the file written is the chosen set
    alone = {b.name: b.alone_val_accuracy for b in result.blocks}  # the 3 most sensitive, each alone in float
    assert alone == {"a": pytest.approx(0.893), "c": pytest.approx(0.697), "b": pytest.approx(0.696), "d": None}
    assert next(b for b in result.blocks if b.name == "d").cost is None  # not among the timed: never chosen


def test_a_fallback_is_free_when_faster_somewhere_and_slower_nowhere():
    from toolchain.onnx.sensitivity import faster_in_float

    # the demo's stem: 0.99x [0.90, 1.14] at batch 1, 1.13x [1.05, 1.22] at batch 32
    assert faster_in_float(Block("stem", "Conv", cost_interval={"1": [0.99, 0.90, 1.14], "32": [1.13, 1.05, 1.22]}))
    assert not faster_in_float(Block("s", "Conv", cost_interval={"1": [1.2, 1.1, 1.3], "32": [0.9, 0.85, 0.95]}))
    assert not faster_in_float(Block("n", "Conv", cost_interval={"1": [1.0, 0.9, 1.1]}))
    assert not faster_in_float(Block("u", "Conv"))


def test_divergence_is_the_relative_mse_of_logits():
    ref = np.array([[1.0, -1.0], [2.0, 0.0]])
    assert divergence(ref, ref) == 0.0 and divergence(ref, ref * 2) == pytest.approx(np.mean(ref**2) / np.var(ref))


@pytest.mark.slow  # the search quantizes the tiny student once per block (60) and trains it first
def test_the_auto_candidate_runs_in_the_stage_and_the_card_says_why(tiny_recipe, tmp_path, capsys):
    path = tiny_recipe(
        teacher=None,
        distill={"epochs": 1, "lr": 0.05, "loss": "ce"},
        export={"exporter": "torchscript", "opset": 17, "references": False},
        quantize={
            "candidates": ["auto"],
            "calibration_images": 32,
            "max_accuracy_drop": 0.0,  # any drop makes the search time blocks and keep some float
            "latency": {"block_s": 0.01, "blocks": 2, "min_replicates": 2, "max_replicates": 2},
            "intra_op_threads": 1,
            "auto": {"images": 16, "timed_blocks": 2, "timing_budget_s": 5},
        },
        bench=None,
        package=None,
    )
    assert run(["compress", str(path)]) == 0
    run_dir = tmp_path / "export" / "tiny"
    quantize_entry = json.loads((run_dir / "summary.json").read_text())["stages"]["quantize"]
    row = next(r for r in quantize_entry["info"]["candidates"] if r["name"] == "auto")
    auto = row["auto"]
    assert auto["blocks"] and all(b["divergence"] is not None for b in auto["blocks"])
    sens = [b["sensitivity"] for b in auto["blocks"]]
    assert sens == sorted(sens, reverse=True)
    assert set(auto["kept_float"]) == {b["name"] for b in auto["blocks"] if b["kept_float"]}
    assert row["timed"] and "auto" in quantize_entry["info"]["reason"]  # judged by the gate like any candidate
    assert all(b["cost"] is not None for b in auto["blocks"] if b["kept_float"])  # measured before chosen
    # the kept-float blocks onnxruntime runs in INT8 are named from the shipped file itself
    auto_file = next((tmp_path / "export" / ".cache").glob("quantize-*/candidates/auto.onnx"))
    runs = {n.name for n in runtime_int8(onnx.load(str(auto_file)).graph)}
    assert auto["kept_float_runs_int8"] == [n for n in auto["kept_float"] if n in runs]
    card = json.loads((run_dir / "model_card.json").read_text())
    assert next(r for r in card["int8"]["candidates"] if r["name"] == "auto")["auto"]["line"] == auto["line"]
    assert f"INT8 {auto['line']}" in capsys.readouterr().out


def test_a_fallback_measured_faster_is_kept_even_within_the_gate_and_a_slower_one_is_not(tmp_path):
    s = Synthetic()
    s.damage = {"a": 0.0, "b": 0.0, "c": 0.0}
    s.cost = {"a": 0.10, "b": -0.10, "c": 0.05}
    profile = {"b": 0.08, "c": 0.02}  # the profile says b and c may run faster in float; a is not profiled slow
    search = BlockSearch(s.build, s.logits_of, s.accuracy_of, s.time_fallbacks, tmp_path, profile=lambda base: profile)
    (tmp_path / "float.onnx").write_text("[]")
    result, _ = search.run([Block(n, "Conv") for n in "abc"], s.logits_of(tmp_path / "float.onnx"), 0.90, 0.01, 2)
    assert result.kept_float == ["b"]  # measured faster in float; c measured slower, a never timed
    timed = {b.name: b.cost for b in result.blocks if b.cost is not None}
    assert timed == {"b": -0.10, "c": 0.05}
    assert {b.name: b.profile_gain for b in result.blocks} == {"a": None, "b": 0.08, "c": 0.02}


def test_a_block_onnxruntime_runs_in_int8_anyway_is_not_timed_for_a_faster_float_kernel(tmp_path):
    # b's INT8 kernel profiles slower than its float one, but b is fed by an INT8 activation: kept float
    # in the file, onnxruntime quantizes it all the same, so no float kernel exists to gain from. a is
    # sensitive and runs INT8 anyway too: its file is still a measured alternative, timed and kept.
    s = Synthetic()
    s.damage = {"a": 0.05, "b": 0.0, "c": 0.0}
    s.cost = {"a": 0.01, "b": -0.10, "c": -0.10}
    s.runs_int8 = frozenset({"a", "b"})
    profile = {"b": 0.08, "c": 0.05}
    search = BlockSearch(s.build, s.logits_of, s.accuracy_of, s.time_fallbacks, tmp_path, profile=lambda base: profile)
    (tmp_path / "float.onnx").write_text("[]")
    result, _ = search.run([Block(n, "Conv") for n in "abc"], s.logits_of(tmp_path / "float.onnx"), 0.90, 0.01, 2)
    flags = {b.name: b.runs_int8 for b in result.blocks}
    assert flags == {"a": True, "b": True, "c": False}
    timed = {b.name for b in result.blocks if b.cost is not None}
    assert timed == {"a", "c"}  # b's profile gain is void; a is timed as the sensitive block it is
    assert sorted(result.kept_float) == ["a", "c"]


def test_profiles_map_back_to_the_blocks_they_ran(tmp_path):
    from toolchain.bench.profile import node_profile
    from toolchain.onnx.sensitivity import profile_gains

    pre = tmp_path / "pre.onnx"
    preprocess(tiny_dw_model(tmp_path / "float.onnx"), pre)
    rng = np.random.default_rng(3)
    reader = CalibrationReader([(rng.uniform(0, 1, (8, 3, 16, 16)).astype(np.float32), np.zeros(8))], "input", 8)
    quantize(pre, tmp_path / "int8.onnx", CANDIDATES.get("auto"), reader)
    f = node_profile(pre, batch_size=2, runs=3, replicates=1)["nodes"]
    q = node_profile(tmp_path / "int8.onnx", batch_size=2, runs=3, replicates=1)["nodes"]
    gains = profile_gains(pre, f, q)
    assert {"stem", "dw", "pw1", "pw2", "fc"} <= set(gains)  # every INT8 kernel found its block


def test_the_report_shows_each_runs_per_block_table():
    from toolchain.report import int8_block_sections

    search = {
        "line": "auto: 3 blocks ranked; kept in float: stem; val acc 0.8938 (all INT8: 0.8930)",
        "blocks": [
            {"name": "stem", "op": "Conv", "sensitivity": 1e-4, "divergence": 2e-4, "profile_gain": 0.08, "alone_val_accuracy": 0.895,
             "cost": -0.07, "cost_interval": {"1": [1.03, 0.84, 1.20], "32": [1.14, 1.12, 1.16]}, "kept_float": True},
            {"name": "pw", "op": "Conv", "sensitivity": 5e-5, "divergence": 3e-4, "profile_gain": None,
             "cost": None, "cost_interval": None, "kept_float": False},
        ],
    }  # fmt: skip
    text = "\n".join(int8_block_sections({"demo": search}))
    assert "## INT8 layer by layer (`auto`)" in text and "### demo" in text and search["line"] in text
    assert (
        "| stem | Conv | 1.00e-04 | 2.00e-04 | 0.8950 | +0.080 | bs1 1.03x [0.84, 1.20] / bs32 1.14x [1.12, 1.16] | yes |"
        in text
    )
    assert "| pw | Conv | 5.00e-05 | 3.00e-04 | - | - | - |  |" in text
    assert int8_block_sections({}) == []
