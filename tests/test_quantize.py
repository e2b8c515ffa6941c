"""INT8 quantization: the calibration reader, CPU features, the selection gate, bad input, and a
real quantize_static on a tiny exported model."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import REDUCE_RANGE, benchmark_module, fast_bench, tiny_dw_model

from toolchain.bench.compare import interval
from toolchain.cli import run
from toolchain.engine.runner import plan
from toolchain.errors import RecipeError
from toolchain.onnx.quantize import (
    CANDIDATES,
    CalibrationReader,
    Measured,
    choose,
    choose_within,
    cpu_features,
    needs_reduce_range,
)
from toolchain.recipe import validate_dict

X86_VNNI = "model name\t: AMD EPYC 9B14\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n"
X86_OLD = "model name\t: Intel(R) Xeon(R) CPU E5-2680 v4\nflags\t\t: fpu sse avx2\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\nCPU part\t: 0xd0c\n"


def test_calibration_reader_feeds_exactly_the_limit_in_float32_and_rewinds():
    batches = [(torch.zeros(10, 3, 4, 4, dtype=torch.float64), torch.zeros(10)) for _ in range(3)]
    reader = CalibrationReader(batches, "input", limit=25, batch_size=8)
    sizes = []
    while (item := reader.get_next()) is not None:
        assert set(item) == {"input"} and item["input"].dtype == np.float32
        sizes.append(len(item["input"]))
    assert sum(sizes) == 25 and max(sizes) <= 8 and reader.images_read == 25
    reader.rewind()
    assert len(reader.get_next()["input"]) == 8  # a second candidate calibrates on the same images


def test_cpu_features_read_the_isa_flags(monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    vnni, old = cpu_features(X86_VNNI), cpu_features(X86_OLD)
    assert vnni["vnni"] and vnni["avx512"] and vnni["cpu"] == "AMD EPYC 9B14"
    assert not old["vnni"] and old["avx2"]
    assert not needs_reduce_range(vnni) and needs_reduce_range(old)  # onnxruntime's advice without VNNI
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    arm = cpu_features(ARM)
    assert arm["arm_dotprod"] and arm["arm_i8mm"] and not needs_reduce_range(arm)


def _sure(*ratios):
    """Intervals as tight as many agreeing replicates give, one per batch size (1, 32)."""
    return {b: interval([r * 0.99, r, r * 1.01]) for b, r in zip((1, 32), ratios)}


def test_choose_ships_the_fastest_candidate_within_the_accuracy_gate():
    fast_but_wrong = Measured("a", 0.85, _sure(5.0, 5.0))  # 5 points lost
    good = Measured("b", 0.895, _sure(1.67, 1.67))
    better = Measured("c", 0.892, _sure(2.0, 2.0))
    chosen, why = choose(0.90, [fast_but_wrong, good, better], max_accuracy_drop=0.01)
    assert chosen is better and "2.00x [1.9" in why and "at batch 32" in why


def test_choose_keeps_float_when_no_candidate_is_faster_everywhere():
    slower_at_bs1 = Measured("qdq_s8s8_per_channel", 0.90, _sure(0.53, 1.43))  # the measured trap: slower at batch 1
    chosen, why = choose(0.90, [slower_at_bs1], max_accuracy_drop=0.01)
    assert chosen is None and "not 1.10x faster at every batch size" in why and "0.53x" in why
    within_noise = Measured("noise", 0.90, _sure(1.03, 1.04))  # 3-4% faster: not a measured win
    assert choose(0.90, [within_noise], max_accuracy_drop=0.01)[0] is None
    assert choose(0.90, [within_noise], max_accuracy_drop=0.01, min_speedup=1.0)[0] is within_noise


def test_choose_keeps_float_when_the_interval_straddles_the_gate_and_says_so():
    """The demo of issue 29: processes measured 0.97x and 1.80x; the median clears 1.1, the interval does not."""
    noisy = Measured("fold", 0.90, {1: interval([0.97, 1.80, 1.04, 1.57, 1.03]), 32: interval([1.72, 1.37, 1.65])})
    chosen, why = choose(0.90, [noisy], max_accuracy_drop=0.01)
    assert chosen is None and why.startswith("too noisy to decide") and "straddles 1.10x" in why
    clear = Measured("fold", 0.90, {1: interval([1.30, 1.32, 1.31]), 32: interval([1.72, 1.70, 1.69])})
    assert choose(0.90, [clear], max_accuracy_drop=0.01)[0] is clear


def test_a_file_size_limit_ships_the_fastest_accurate_file_that_fits_even_if_not_faster():
    """quantize.max_file_bytes: over-size files never ship; with the float file over the limit, size is
    the budget and the fastest accurate file that fits ships, faster than float or not; with none, float
    ships and the reason says the limit is missed."""
    big_fast = Measured("big", 0.90, _sure(2.0, 2.0))
    small_slow = Measured("small", 0.90, _sure(0.9, 0.95))  # slower than float: the latency gate refuses it
    small_wrong = Measured("wrong", 0.80, _sure(3.0, 3.0))
    sizes = {"float": 40000, "big": 12000, "small": 9000, "wrong": 8000}
    assert choose(0.90, [big_fast, small_slow], 0.01)[0] is big_fast  # no limit
    chosen, why = choose_within(0.90, [big_fast, small_slow, small_wrong], 0.01, 1.1, sizes, 10000)
    assert chosen is small_slow and "float file (40000 bytes) is over quantize.max_file_bytes 10000" in why
    chosen, why = choose_within(0.90, [big_fast, small_wrong], 0.01, 1.1, sizes, 10000)
    assert chosen is None and "no candidate within the accuracy gate fits it" in why and "big is 12000 bytes" in why
    # the float file fits: the usual latency decision among the files that fit
    chosen, why = choose_within(0.90, [big_fast, small_slow], 0.01, 1.1, {**sizes, "float": 9500}, 10000)
    assert chosen is None and "over quantize.max_file_bytes 10000: big is 12000 bytes" in why
    assert choose_within(0.90, [big_fast, small_slow], 0.01, 1.1, sizes, None)[0] is big_fast


def test_a_quantize_section_needs_export_and_known_candidates():
    base = {"name": "q", "student": {"model": "mobilenet_v2"}, "distill": {"loss": "ce"}}
    with pytest.raises(RecipeError, match="quantize needs the export stage"):
        plan(validate_dict({**base, "export": None, "bench": None, "quantize": {}}))  # declared: Stage.requires
    with pytest.raises(RecipeError, match="Did you mean 'qdq_u8s8_per_tensor'"):
        validate_dict({**base, "quantize": {"candidates": ["qdq_u8s8_per_tensr"]}})
    assert validate_dict({**base, "quantize": {}}).quantize.candidates[0] in CANDIDATES


def test_calibration_larger_than_the_data_is_one_line(tiny_recipe, capsys):
    path = tiny_recipe(
        teacher=None,
        distill={"epochs": 0, "loss": "ce"},
        export={"exporter": "dynamo", "opset": 18},
        quantize={"calibration_images": 5000},
    )
    assert run(["compress", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: quantize.calibration_images is 5000 but the training split has 270 images; "
        "set quantize.calibration_images: 270 or less"
    ]


def test_quantize_stage_builds_measures_and_ships_or_keeps_float(tiny_recipe, tmp_path):
    """Real quantize_static on the tiny exported student; whichever way the measurement goes,
    what ships matches what the card and the bench say."""
    path = tiny_recipe(
        teacher=None,
        distill={"epochs": 1, "lr": 0.05, "loss": "ce"},
        export={"exporter": "torchscript", "opset": 17, "references": False},
        quantize={
            "candidates": ["qdq_u8s8_per_tensor", "qoperator_u8s8_per_tensor", "qdq_u8s8_dw_per_channel"],
            "calibration_images": 64,
            "max_accuracy_drop": 1.0,
            "latency": {"block_s": 0.01, "blocks": 2, "min_replicates": 2, "max_replicates": 2},
            "min_speedup": 1.0,
            "intra_op_threads": 1,
        },
        bench=fast_bench(1, 2),
    )
    assert run(["compress", str(path)]) == 0
    run_dir = tmp_path / "export" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    quantize, card = summary["stages"]["quantize"], json.loads((run_dir / "model_card.json").read_text())
    table = {row["name"]: row for row in quantize["info"]["candidates"]}
    assert set(table) == {"qdq_u8s8_per_tensor", "qoperator_u8s8_per_tensor", "qdq_u8s8_dw_per_channel"}
    built = {p.stem: p for p in (tmp_path / "export").glob(".cache/quantize-*/candidates/*.onnx")}
    # the same calibration images for every candidate: the same activation ranges in both QDQ models
    assert _activation_scales(built["qdq_u8s8_per_tensor"]) == _activation_scales(built["qdq_u8s8_dw_per_channel"])
    for row in table.values():  # an INT8 file is smaller than the float one, and deflates
        assert (
            0
            < row["sizes"]["zip_bytes"]
            <= row["sizes"]["bytes"]
            < summary["stages"]["export"]["metrics"]["onnx_file_size_bytes"]
        )
    bench_models = json.loads((run_dir / "bench.json").read_text())["onnxruntime"]
    if quantize["metrics"]["int8.shipped"]:
        assert card["int8"]["shipped"] and card["int8"]["candidate"] == quantize["info"]["chosen"]
        assert (run_dir / "model_int8.onnx").is_file() and "int8" in bench_models
        assert min(low for low, _ in table[card["int8"]["candidate"]]["speedup_interval"].values()) >= 1
        assert "int8.vs_student.pe_params" not in quantize["metrics"]  # the student is the final model: no reference
    else:
        assert not card["int8"]["shipped"] and not (run_dir / "model_int8.onnx").exists() and "int8" not in bench_models
    assert card["int8"]["cpu_features"]["machine"] and card["int8"]["min_speedup"] == 1.0  # the gate it faced
    assert (
        quantize["info"]["intra_op_threads"] == card["int8"]["intra_op_threads"] == 1
    )  # the device's thread count, as the recipe says


def _fed_comparison(monkeypatch, ratios):
    """The stage's comparison with fed replicates: each replicate gives every candidate the next ratio."""
    import toolchain.stages.quantize as stage
    from toolchain.bench.compare import compare

    it = iter(ratios)

    def replicate(spec):
        r = next(it)
        keys = [f"{name}@{bs}" for name in spec["files"] for bs in spec["batch_sizes"]]
        return {
            "ratios": {f"{b}|{c}@{bs}": r for b, c in spec["pairs"] for bs in spec["batch_sizes"]},
            "medians_ms": {k: 1.0 for k in keys},
            "times": {k: [1e-3, 1e-3] for k in keys},
            "shapes": {k: [int(k.rsplit("@", 1)[1]), 3, 32, 32] for k in keys},
        }

    monkeypatch.setattr(stage, "compare", lambda *a, **kw: compare(*a, **kw, replicate=replicate))


def test_quantize_gate_ships_on_a_clear_interval_and_keeps_float_on_a_straddling_one(
    tiny_recipe, tmp_path, monkeypatch, capsys
):
    """Fed ratios: the whole path from the interval to the card, the closing line and MLflow."""
    import mlflow

    def recipe(min_speedup):
        return tiny_recipe(
            teacher=None,
            distill={"epochs": 1, "lr": 0.05, "loss": "ce"},
            export={"exporter": "torchscript", "opset": 17, "references": False},
            quantize={
                "candidates": ["qdq_u8s8_per_tensor"],
                "calibration_images": 32,
                "max_accuracy_drop": 1.0,
                "min_speedup": min_speedup,
                "latency": {"min_replicates": 3, "max_replicates": 5},
            },
        )

    _fed_comparison(monkeypatch, [1.50, 1.52, 1.51])
    assert run(["compress", str(recipe(1.1))]) == 0
    run_dir = tmp_path / "export" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    m, card = summary["stages"]["quantize"]["metrics"], json.loads((run_dir / "model_card.json").read_text())
    assert card["int8"]["shipped"] and (run_dir / "model_int8.onnx").is_file()
    for b in (1, 32):
        assert m[f"int8.speedup.bs{b}_lo"] <= m[f"int8.speedup.bs{b}"] == 1.51 <= m[f"int8.speedup.bs{b}_hi"]
        assert m[f"int8.speedup.bs{b}_lo"] >= 1.1
        assert card["int8"]["speedup_vs_float"][str(b)]["low"] == m[f"int8.speedup.bs{b}_lo"]
    assert card["int8"]["latency"]["stopped"] == "converged" and card["int8"]["latency"]["replicates"] == 3
    closing = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("INT8: "))
    assert "1.51x [" in closing and "at batch 32" in closing and "95% interval" in closing
    logged = (
        mlflow.MlflowClient(summary["mlflow"]["tracking_uri"]).get_run(summary["mlflow"]["parent_run_id"]).data.metrics
    )
    assert {"int8.speedup.bs1", "int8.speedup.bs1_lo", "int8.speedup.bs1_hi", "int8.speedup.bs32_lo"} <= set(logged)

    _fed_comparison(monkeypatch, [0.97, 1.80, 1.04, 1.57, 1.03])  # issue 29's processes
    assert run(["compress", str(recipe(1.15))]) == 0
    card = json.loads((run_dir / "model_card.json").read_text())
    assert not card["int8"]["shipped"] and not (run_dir / "model_int8.onnx").exists()
    assert card["int8"]["why"].startswith("too noisy to decide") and "stopped: max_replicates" in card["int8"]["why"]
    assert card["int8"]["latency"]["replicates"] == 5
    # the quantize stage speaks for post-training INT8 only: a qad stage after it may still ship a file
    closing = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("INT8: "))
    assert closing.startswith("INT8: no post-training candidate ships (too noisy to decide")


def _activation_scales(model_path):
    """Tensor name -> scale of every QuantizeLinear of activations (what calibration decided)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model_path)).graph
    inits = {i.name: float(numpy_helper.to_array(i).reshape(-1)[0]) for i in graph.initializer}
    return {
        n.input[0]: inits[n.input[1]] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits
    }


def test_calibration_reader_refuses_a_one_shot_iterator():
    batches = ((torch.zeros(4, 3, 4, 4), torch.zeros(4)) for _ in range(2))
    with pytest.raises(TypeError, match="re-iterable"):  # a second candidate would calibrate on other images
        CalibrationReader(batches, "input", limit=4)


# ---------------------------------------------------------------- candidate options (benchmarks/int8_explore.py)


@pytest.fixture(scope="module")
def tiny_pre(tmp_path_factory):
    from toolchain.onnx.quantize import preprocess

    work = tmp_path_factory.mktemp("dw")
    preprocess(tiny_dw_model(work / "float.onnx"), work / "pre.onnx")
    return work / "pre.onnx"


def _reader():
    rng = np.random.default_rng(1)
    return CalibrationReader([(rng.standard_normal((16, 3, 16, 16)).astype(np.float32), np.zeros(16))], "input", 16)


def _weight_scales(model_path):
    """Conv name -> number of scales of its weight's DequantizeLinear (1: per tensor, C: per channel)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    dq = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    return {
        n.name: int(inits[dq[n.input[1]].input[1]].size) for n in graph.node if n.op_type == "Conv" and n.input[1] in dq
    }


def _optimized_ops(model_path, tmp_path):
    import collections

    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)


def test_new_candidates_are_registered_and_existing_names_still_work():
    for name in (
        "qdq_u8s8_dw_per_channel",
        "qdq_u8s8_dw_per_channel_keep_stem",
        "qdq_u8s8_per_channel_keep_stem",
        "qdq_s8s8_per_channel",
        "qdq_u8s8_per_channel",
        "qdq_u8s8_per_tensor",
        "qoperator_u8s8_per_tensor",
        "qdq_u8s8_per_channel_keep_depthwise",
    ):
        assert CANDIDATES.get(name).name == name
    dw = CANDIDATES.get("qdq_u8s8_dw_per_channel_keep_stem").describe()
    assert dw["per_channel_only"] == ("depthwise",) and dw["keep_first_convs"] == 3 and not dw["per_channel"]
    from toolchain.recipe import QuantizeConfig

    assert all(name in CANDIDATES for name in QuantizeConfig().candidates)


def test_depthwise_only_per_channel_options_reach_quantize_static(tiny_pre, tmp_path, monkeypatch):
    import onnxruntime.quantization as oq

    from toolchain.onnx.quantize import quantize

    seen = {}
    monkeypatch.setattr(oq, "quantize_static", lambda model, out, reader, **kw: seen.update(kw))
    info = quantize(tiny_pre, tmp_path / "q.onnx", CANDIDATES.get("qdq_u8s8_dw_per_channel_keep_stem"), _reader())
    assert seen["per_channel"] is False and seen["quant_format"] == oq.QuantFormat.QDQ
    assert seen["activation_type"] == oq.QuantType.QUInt8 and seen["weight_type"] == oq.QuantType.QInt8
    assert seen["extra_options"]["TensorQuantOverrides"] == {"dw_w": [{"axis": 0}]}  # the depthwise weight only
    assert seen["extra_options"]["ActivationSymmetric"] is False
    assert seen["nodes_to_exclude"] == ["stem", "dw", "pw1"] == info["excluded_nodes"]  # the first three convs


def test_depthwise_only_per_channel_builds_per_channel_dw_and_per_tensor_pointwise(tiny_pre, tmp_path):
    from toolchain.onnx.quantize import quantize

    out = tmp_path / "dw.onnx"
    quantize(tiny_pre, out, CANDIDATES.get("qdq_u8s8_dw_per_channel"), _reader())
    assert _weight_scales(out) == {"stem": 1, "dw": 8, "pw1": 1, "pw2": 1}
    ops = _optimized_ops(out, tmp_path)  # onnxruntime fuses every conv into QLinearConv (NHWC), Clips folded away
    assert ops["QLinearConv"] == 4 and ops["Conv"] == 0 and ops["Clip"] == 0
    per_channel = tmp_path / "pc.onnx"
    quantize(tiny_pre, per_channel, CANDIDATES.get("qdq_u8s8_per_channel"), _reader())
    assert _weight_scales(per_channel) == {"stem": 8, "dw": 8, "pw1": 16, "pw2": 16}


def test_keep_stem_leaves_the_first_convs_float(tiny_pre, tmp_path):
    from toolchain.onnx.quantize import quantize

    out = tmp_path / "stem.onnx"
    quantize(tiny_pre, out, CANDIDATES.get("qdq_u8s8_per_channel_keep_stem"), _reader())
    assert _weight_scales(out) == {"pw2": 16}  # stem, dw, pw1: float weights
    ops = _optimized_ops(out, tmp_path)
    assert ops["QLinearConv"] == 1 and ops["Conv"] == 3


def test_per_channel_only_needs_qdq():
    from toolchain.onnx.quantize import Candidate, QuantizeError, quantize_options

    with pytest.raises(QuantizeError, match="needs format qdq"):
        quantize_options(None, Candidate("x", format="qoperator", per_channel_only=("depthwise",)))


# ---------------------------------------------------------------- batch folding (onnx/fold.py)


def _pointwise_model(path, const_dims=(1, 8, 1, 1), batch="batch"):
    """input [N,4,4,4] -> 1x1 conv 8 -> Clip -> 3x3 depthwise -> Clip -> 1x1 conv 4 -> Add(input) -> 1x1 conv 8
    -> Mul(constant of const_dims) -> output: two pointwise regions around a 3x3 conv, a residual, a constant."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name)

    inits = [
        w("a_w", 8, 4, 1, 1),
        w("a_b", 8),
        w("dw_w", 8, 1, 3, 3),
        w("b_w", 4, 8, 1, 1),
        w("c_w", 8, 4, 1, 1),
        w("scale", *const_dims),
        numpy_helper.from_array(np.array(0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6, np.float32), "hi"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "a_w", "a_b"], ["a"], name="a", kernel_shape=[1, 1]),
        helper.make_node("Clip", ["a", "lo", "hi"], ["a6"], name="a_clip"),
        helper.make_node("Conv", ["a6", "dw_w"], ["d"], name="dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Clip", ["d", "lo", "hi"], ["d6"], name="d_clip"),
        helper.make_node("Conv", ["d6", "b_w"], ["b"], name="b", kernel_shape=[1, 1]),
        helper.make_node("Add", ["b", "x"], ["r"], name="residual"),
        helper.make_node("Conv", ["r", "c_w"], ["c"], name="c", kernel_shape=[1, 1]),
        helper.make_node("Mul", ["c", "scale"], ["y"], name="scale_mul"),
    ]
    graph = helper.make_graph(
        nodes,
        "pointwise",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8, 4, 4])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _run(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _ops(path):
    import collections

    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_folding_the_batch_computes_exactly_the_same_function(tmp_path):
    from toolchain.onnx.fold import fold_batch

    src = _pointwise_model(tmp_path / "m.onnx")
    assert fold_batch(src, tmp_path / "f.onnx", max_pixels=16) == 2  # before and after the depthwise conv
    ops = _ops(tmp_path / "f.onnx")
    # region 1 (a, a_clip): in from x, out to dw; region 2 (b, residual, c, scale_mul): in from d6 and x, out to y
    assert ops["Reshape"] == 5 and ops["Conv"] == 4 and ops["Clip"] == 2
    for batch in (1, 3, 7):
        x = np.random.default_rng(batch).standard_normal((batch, 4, 4, 4)).astype(np.float32)
        np.testing.assert_allclose(_run(tmp_path / "f.onnx", x), _run(src, x), rtol=1e-5, atol=1e-5)
    # a node quantization keeps float stays out (and its activation with it): only region 2 folds
    assert (
        fold_batch(src, tmp_path / "k.onnx", max_pixels=16, keep=["a"]) == 1
        and _ops(tmp_path / "k.onnx")["Reshape"] == 3
    )


def test_folding_leaves_large_maps_spatial_constants_and_a_static_batch_of_1_alone(tmp_path):
    from toolchain.onnx.fold import fold_batch

    src = _pointwise_model(tmp_path / "m.onnx")
    assert fold_batch(src, tmp_path / "f.onnx", max_pixels=15) == 0  # 4x4 maps: 16 pixels
    assert _ops(tmp_path / "f.onnx") == _ops(src)
    # a constant with an H extent broadcasts differently over [1, C, N*H, W]: its Mul stays outside the region
    spatial = _pointwise_model(tmp_path / "s.onnx", const_dims=(1, 8, 4, 1))
    assert fold_batch(_pointwise_model(tmp_path / "b1.onnx", batch=1), tmp_path / "b1f.onnx", max_pixels=16) == 0
    assert fold_batch(spatial, tmp_path / "sf.onnx", max_pixels=16) == 2
    x = np.random.default_rng(0).standard_normal((3, 4, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "sf.onnx", x), _run(spatial, x), rtol=1e-5, atol=1e-5)


def _tail_model(path):
    """input [N,8,2,2] -> 3x3 depthwise (2x2 out) -> 3x3 depthwise stride 2 (1x1 out) -> Clip -> 1x1 conv 16
    -> 3x3 depthwise on the 1x1 map -> 1x1 conv 8: the last stages of a 32x32 mobilenet."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.5, n)
        for n, s in (
            ("a_w", (8, 1, 3, 3)),
            ("b_w", (8, 1, 3, 3)),
            ("c_w", (16, 8, 1, 1)),
            ("d_w", (16, 1, 3, 3)),
            ("d_b", (16,)),
            ("e_w", (8, 16, 1, 1)),
        )
    ]
    inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0), ("hi", 6))]
    dw = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    nodes = [
        helper.make_node("Conv", ["x", "a_w"], ["a"], name="dw_a", group=8, **dw),
        helper.make_node("Conv", ["a", "b_w"], ["b"], name="dw_b", group=8, strides=[2, 2], **dw),
        helper.make_node("Clip", ["b", "lo", "hi"], ["b6"], name="clip_b"),
        helper.make_node("Conv", ["b6", "c_w"], ["c"], name="pw_c", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["c", "d_w", "d_b"], ["d"], name="dw_d", group=16, **dw),
        helper.make_node("Conv", ["d", "e_w"], ["y"], name="pw_e", kernel_shape=[1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "tail",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 1, 1])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_convs_with_a_one_pixel_output_shrink_to_the_taps_that_touch_data_and_fold(tmp_path):
    import onnx
    from onnx import helper

    from toolchain.onnx.fold import fold_batch

    src = _tail_model(tmp_path / "m.onnx")
    assert fold_batch(src, tmp_path / "f.onnx", max_pixels=4) == 1  # dw_b .. pw_e: one region, not four
    convs = {
        n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute}
        for n in onnx.load(str(tmp_path / "f.onnx")).graph.node
        if n.op_type == "Conv"
    }
    assert convs["dw_a"]["kernel_shape"] == [3, 3]  # a 2x2 output: windows overlap, stays spatial and unfolded
    assert (convs["dw_b"]["kernel_shape"], convs["dw_b"]["strides"], convs["dw_b"]["pads"]) == ([2, 2], [2, 2], [0] * 4)
    assert (convs["dw_d"]["kernel_shape"], convs["dw_d"]["strides"], convs["dw_d"]["group"]) == ([1, 1], [1, 1], 16)
    assert _ops(tmp_path / "f.onnx")["Reshape"] == 2  # into the region after dw_a, out of it at y
    for batch in (1, 3, 7):
        x = np.random.default_rng(batch).standard_normal((batch, 8, 2, 2)).astype(np.float32)
        np.testing.assert_allclose(_run(tmp_path / "f.onnx", x), _run(src, x), rtol=1e-5, atol=1e-5)
    assert fold_batch(src, tmp_path / "k.onnx", max_pixels=4, keep=["dw_b"]) == 1  # kept float: not rewritten
    kept = {n.name: n for n in onnx.load(str(tmp_path / "k.onnx")).graph.node}["dw_b"]
    assert [helper.get_attribute_value(a) for a in kept.attribute if a.name == "kernel_shape"] == [[3, 3]]


def test_folded_candidate_quantizes_with_the_same_settings_and_runs_the_region_as_one_image(tiny_pre, tmp_path):
    from toolchain.onnx.quantize import quantize

    name = "qdq_u8s8_dw_per_channel_keep_stem_fold"
    assert CANDIDATES.get(name).describe()["fold_max_pixels"] == 64
    info = quantize(tiny_pre, tmp_path / "fold.onnx", CANDIDATES.get(name), _reader())
    plain = quantize(tiny_pre, tmp_path / "plain.onnx", CANDIDATES.get("qdq_u8s8_dw_per_channel_keep_stem"), _reader())
    assert info["folded_regions"] == 1 and plain["folded_regions"] == 0  # pw2 on 8x8 maps; pw1 is kept float
    assert info["excluded_nodes"] == plain["excluded_nodes"] == ["stem", "dw", "pw1"]
    assert _weight_scales(tmp_path / "fold.onnx") == _weight_scales(tmp_path / "plain.onnx") == {"pw2": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fold.onnx", "plain.onnx"]  # no folded input left behind
    ops, plain_ops = _optimized_ops(tmp_path / "fold.onnx", tmp_path), _optimized_ops(tmp_path / "plain.onnx", tmp_path)
    # onnxruntime cancelled the region's transposes against its own NHWC ones: only the two Reshapes are added
    assert ops["QLinearConv"] == 1 and ops["Transpose"] == plain_ops["Transpose"]
    assert ops["Reshape"] == plain_ops["Reshape"] + 2
    x = np.random.default_rng(2).standard_normal((5, 3, 16, 16)).astype(np.float32)
    import onnxruntime as ort

    outs = [
        ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        for f in ("fold.onnx", "plain.onnx")
    ]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)  # same quantization, same arithmetic, other layout


# ---------------------------------------------------------------- wide convs to the general QGEMM (onnx/gemm_route.py)


def _weights_and_zero_points(model_path):
    """Conv name -> (int8 weight, zero point) of its weight's DequantizeLinear."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    dq = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    return {
        n.name: (inits[dq[n.input[1]].input[0]], inits[dq[n.input[1]].input[2]])
        for n in graph.node
        if n.op_type == "Conv" and n.input[1] in dq
    }


def test_wide_convs_get_a_zero_point_of_minus_one_and_compute_the_same(tiny_pre, tmp_path):
    import onnxruntime as ort

    from toolchain.onnx.quantize import Candidate, quantize

    plain = quantize(
        tiny_pre, tmp_path / "plain.onnx", Candidate("p", per_channel_only=("depthwise",)), _reader(), REDUCE_RANGE
    )
    wide = quantize(
        tiny_pre,
        tmp_path / "gemm.onnx",
        Candidate("g", per_channel_only=("depthwise",), gemm_min_weights=16),
        _reader(),
        REDUCE_RANGE,
    )
    assert plain["gemm_convs"] == 0 and wide["gemm_convs"] == 2
    before, after = _weights_and_zero_points(tmp_path / "plain.onnx"), _weights_and_zero_points(tmp_path / "gemm.onnx")
    for name in ("stem", "pw2"):  # 27 and 16 weights per output channel
        assert not before[name][1].any() and (after[name][1] == -1).all()
        np.testing.assert_array_equal(after[name][0].astype(int) - after[name][1], before[name][0])  # w - zp unchanged
    for name in ("dw", "pw1"):  # a depthwise conv (group 8) and a conv with 8 weights per output channel
        np.testing.assert_array_equal(after[name][0], before[name][0])
        assert not after[name][1].any()
    ops = _optimized_ops(tmp_path / "gemm.onnx", tmp_path)
    assert ops["QLinearConv"] == 4 and ops["Conv"] == 0  # onnxruntime still fuses every conv
    x = np.random.default_rng(3).standard_normal((4, 3, 16, 16)).astype(np.float32)
    outs = [
        ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        for f in ("plain.onnx", "gemm.onnx")
    ]
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


def test_a_weight_of_minus_128_is_left_on_the_symmetric_kernel(tiny_pre, tmp_path):
    import onnx
    from onnx import numpy_helper

    from toolchain.onnx.gemm_route import route_wide_convs_to_gemm
    from toolchain.onnx.quantize import Candidate, quantize

    path = tmp_path / "q.onnx"
    quantize(tiny_pre, path, Candidate("p", per_channel_only=("depthwise",)), _reader())
    model = onnx.load(str(path))
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    pw2 = next(n for n in model.graph.node if n.name == "pw2")
    init = next(i for i in model.graph.initializer if i.name == dq[pw2.input[1]].input[0])
    w = numpy_helper.to_array(init).copy()
    w.flat[0] = -128  # w - 1 would wrap to +127
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path))
    assert route_wide_convs_to_gemm(path, 16) == 1  # the stem only
    after = _weights_and_zero_points(path)
    assert (after["stem"][1] == -1).all() and not after["pw2"][1].any()
    assert route_wide_convs_to_gemm(path, 16) == 0  # zero point no longer 0: nothing left to move


def test_gemm_candidates_are_qdq_int8_weights_only():
    from toolchain.onnx.quantize import Candidate

    with pytest.raises(ValueError, match="needs format qdq and int8 weights"):
        Candidate("x", format="qoperator", gemm_min_weights=320)
    assert CANDIDATES.get("qdq_u8s8_dw_per_channel_keep_stem_fold_gemm").describe()["gemm_min_weights"] == 320


def test_gemm_route_benchmark_times_two_kernels_of_the_same_function():
    """benchmarks/gemm_route.py compares kernels, so its zero point 0 and -1 models must compute the same
    outputs, for the dense and the depthwise rows alike."""
    import onnxruntime as ort

    bench = benchmark_module("gemm_route")
    for cin, cout, k, depthwise in ((16, 8, 1, False), (8, 8, 3, False), (16, 16, 3, True)):
        x = {"x": np.random.default_rng(2).integers(0, 256, (1, 6, 6, cin)).astype(np.uint8)}
        y = [
            ort.InferenceSession(
                bench.conv_model(cin, cout, 6, k, zp, depthwise), providers=["CPUExecutionProvider"]
            ).run(None, x)[0]
            for zp in (0, -1)
        ]
        assert y[0].shape == (1, 6, 6, cout) and np.array_equal(y[0], y[1])


def test_a_spatial_reduce_mean_quantizes_only_once_it_is_a_global_average_pool(tmp_path):
    """Why export rewrites the dynamo exporter's ReduceMean: onnxruntime's quantizer leaves ReduceMean
    float (a DequantizeLinear of the whole map in front of it) but runs GlobalAveragePool in INT8."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from toolchain.onnx.pooling import simplify_global_pools
    from toolchain.onnx.quantize import preprocess, quantize

    model = onnx.load(str(tiny_dw_model(tmp_path / "gap.onnx")))
    graph = model.graph
    i, pool = next((i, n) for i, n in enumerate(graph.node) if n.op_type == "GlobalAveragePool")
    graph.node.remove(pool)
    graph.node.insert(i, helper.make_node("ReduceMean", ["p2", "axes"], ["g"], name="pool", keepdims=1))
    graph.initializer.append(numpy_helper.from_array(np.array([-2, -1], np.int64), "axes"))
    model.opset_import[0].version = 18
    x = {"input": np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    ops, outputs = {}, {}
    for rewrite in (False, True):
        work = tmp_path / str(rewrite)
        work.mkdir()
        m = copy.deepcopy(model)
        if rewrite:
            assert simplify_global_pools(m) == 1
        assert ("axes" in {t.name for t in m.graph.initializer}) is not rewrite
        onnx.save(m, str(work / "float.onnx"))
        outputs[rewrite] = ort.InferenceSession(str(work / "float.onnx"), providers=["CPUExecutionProvider"]).run(
            None, x
        )[0]
        preprocess(work / "float.onnx", work / "pre.onnx")
        quantize(work / "pre.onnx", work / "int8.onnx", CANDIDATES.get("qdq_u8s8_dw_per_channel"), _reader())
        ops[rewrite] = _optimized_ops(work / "int8.onnx", work)
    np.testing.assert_allclose(outputs[True], outputs[False], rtol=1e-6, atol=1e-6)
    assert ops[False]["ReduceMean"] == 1 and "QLinearGlobalAveragePool" not in ops[False]
    assert ops[True]["QLinearGlobalAveragePool"] == 1 and "ReduceMean" not in ops[True]


def test_quantize_benchmark_trains_a_model_at_the_asked_size_and_exports_it(tmp_path):
    """benchmarks/quantize.py --trained: the model is trained on Fashion-MNIST at the asked input size (real
    accuracy for the INT8 gate) and its ONNX file, calibration, validation and test batches all have that size."""
    import onnxruntime as ort

    bench = benchmark_module("quantize")
    path, calib, val, test = bench.train_fmnist("cifar_resnet20", 40, 200, 1, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "input"
    for batches in (calib, val, test):
        x, _ = next(iter(batches))
        assert tuple(x.shape[1:]) == (3, 40, 40)
        assert session.run(None, {"input": x.numpy()})[0].shape == (len(x), 10)
    assert not calib.augment and not calib.shuffle
    assert sum(len(y) for _, y in test) == 1000 and sum(len(y) for _, y in val) == 20


def _optimized_weight_feeds(path, tmp_path):
    """Conv / Gemm name -> the node that feeds its weight after onnxruntime's basic optimizations (None: an initializer)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph
    producers = {o: n for n in optimized.node for o in n.output}
    return {n.name: producers.get(n.input[1]) for n in optimized.node if n.op_type in ("Conv", "Gemm")}


def test_a_float_block_after_an_int8_activation_runs_in_float_in_onnxruntime(tiny_pre, tmp_path):
    """A Conv kept float whose input is an INT8 activation would get INT8 weights from onnxruntime's
    WeightBiasQuantization; with its own per-axis DequantizeLinear (float_fallback.py) it keeps its
    float weights. Without the rewrite, onnxruntime quantizes it (what graph.runtime_int8 predicts)."""
    import onnx

    from toolchain.onnx.float_fallback import run_in_float, undo
    from toolchain.onnx.graph import runtime_int8
    from toolchain.onnx.quantize import quantize

    candidate = CANDIDATES.get("qdq_u8s8_dw_per_channel")
    info = quantize(tiny_pre, tmp_path / "q.onnx", candidate, _reader(), float_nodes=["stem", "pw1"])
    assert info["float_nodes_own_dequantize"] == ["pw1"] and info["float_nodes_run_int8"] == []
    feeds = _optimized_weight_feeds(tmp_path / "q.onnx", tmp_path)
    assert feeds["pw1"] is None and feeds["stem"] is None  # both run their float kernels
    assert feeds["pw2"] is not None and feeds["pw2"].op_type == "DequantizeLinear"  # an INT8 neighbour stays INT8

    # the same file without the rewrite: onnxruntime gives pw1 INT8 weights, as runtime_int8 says
    model = onnx.load(str(tmp_path / "q.onnx"))
    undo(model)
    assert [n.name for n in runtime_int8(model.graph)] == ["pw1"]
    onnx.save(model, str(tmp_path / "plain.onnx"))
    feeds = _optimized_weight_feeds(tmp_path / "plain.onnx", tmp_path)
    assert feeds["pw1"] is not None and feeds["pw1"].op_type == "DequantizeLinear"
    assert run_in_float(model) == ["pw1"] and runtime_int8(model.graph) == []


def test_runtime_int8_leaves_a_float_classifier_whose_logits_are_the_output(tiny_pre, tmp_path):
    """onnxruntime re-quantizes a float Conv / Gemm only where its output leads to a QuantizeLinear;
    the classifier's logits are the graph's output, so a classifier kept float stays float."""
    import onnx

    from toolchain.onnx.quantize import quantize

    info = quantize(
        tiny_pre, tmp_path / "q.onnx", CANDIDATES.get("qdq_u8s8_dw_per_channel"), _reader(), float_nodes=["fc"]
    )
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    producers = {o: n for n in graph.node for o in n.output}
    fc = next(n for n in graph.node if n.name == "fc")
    assert producers[fc.input[0]].op_type == "DequantizeLinear"  # fed by an INT8 activation all the same
    feeds = _optimized_weight_feeds(tmp_path / "q.onnx", tmp_path)
    assert info["float_nodes_run_int8"] == [] and info["float_nodes_own_dequantize"] == []
    assert feeds["fc"] is None


@pytest.mark.parametrize(
    "remeasured, gate, claim, decision, failed",
    [
        ((1.30, 1.20, 1.45), 1.10, "holds", "reproduced", False),
        ((1.15, 1.02, 1.30), 1.10, "holds", "marginal", False),
        # the demo's batch-1 INT8 claim on the AVX2 machine: 1.27x [1.10, 1.45] shipped at a 1.10x gate,
        # re-measured 1.04x [0.75, 1.69]: the intervals overlap, but a second measurement would not ship it
        ((1.04, 0.75, 1.69), 1.10, "holds", "NOT reproduced", False),
        ((1.02, 0.98, 1.06), 1.10, "FAILS", "REFUTED", True),
        ((1.02, 0.98, 1.06), None, "FAILS", "", True),
        ((1.50, 1.40, 1.60), None, "holds", "", False),
    ],
)
def test_check_claims_judges_the_shipping_decision_not_only_the_overlap(remeasured, gate, claim, decision, failed):
    """benchmarks/check_claims.py: an INT8 claim 1.27x [1.10, 1.45] against its re-measurement, and the
    decision (lower end >= quantize.min_speedup) against the same re-measurement."""
    said_claim, said_decision, bad = benchmark_module("check_claims").verdicts(1.10, *remeasured, gate)
    assert said_claim.startswith(claim) and said_decision.startswith(decision) and bad == failed
