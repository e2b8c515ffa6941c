"""INT8 quantization: the calibration reader, CPU features, the selection gate, bad input, and a
real quantize_static on a tiny exported model."""

import json

import numpy as np
import pytest
import torch

from toolchain.cli import run
from toolchain.errors import RecipeError
from toolchain.onnx.quantize import CANDIDATES, CalibrationReader, Measured, choose, cpu_features, needs_reduce_range
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


FLOAT = Measured("float", 0.90, {1: 1.0, 32: 10.0})


def test_choose_ships_the_fastest_candidate_within_the_accuracy_gate():
    fast_but_wrong = Measured("a", 0.85, {1: 0.2, 32: 2.0})  # 5 points lost
    good = Measured("b", 0.895, {1: 0.6, 32: 6.0})
    better = Measured("c", 0.892, {1: 0.5, 32: 5.0})
    chosen, why = choose(FLOAT, [fast_but_wrong, good, better], max_accuracy_drop=0.01)
    assert chosen is better and "2.00x / 2.00x" in why


def test_choose_keeps_float_when_no_candidate_is_faster_everywhere():
    slower_at_bs1 = Measured("qdq_s8s8_per_channel", 0.90, {1: 1.9, 32: 7.0})  # the measured trap: slower at batch 1
    chosen, why = choose(FLOAT, [slower_at_bs1], max_accuracy_drop=0.01)
    assert chosen is None and "not 1.10x faster at every batch size" in why and "0.53x" in why
    within_noise = Measured("noise", 0.90, {1: 0.97, 32: 9.6})  # 3-4% faster: not a measured win
    assert choose(FLOAT, [within_noise], max_accuracy_drop=0.01)[0] is None
    assert choose(FLOAT, [within_noise], max_accuracy_drop=0.01, min_speedup=1.0)[0] is within_noise


def test_choose_gate_is_inclusive_and_absolute():
    edge = Measured("edge", 0.89, {1: 0.5, 32: 5.0})
    assert choose(FLOAT, [edge], max_accuracy_drop=0.01)[0] is edge
    assert choose(FLOAT, [edge], max_accuracy_drop=0.005)[0] is None


def test_a_quantize_section_needs_export_and_known_candidates():
    base = {"name": "q", "student": {"model": "mobilenet_v2"}, "distill": {"loss": "ce"}}
    with pytest.raises(RecipeError, match="quantize needs the export stage"):
        validate_dict({**base, "export": None, "bench": None, "quantize": {}})
    with pytest.raises(RecipeError, match="Did you mean 'qdq_u8s8_per_tensor'"):
        validate_dict({**base, "quantize": {"candidates": ["qdq_u8s8_per_tensr"]}})
    assert validate_dict({**base, "quantize": {}}).quantize.candidates[0] in CANDIDATES


def test_calibration_larger_than_the_data_is_one_line(tiny_recipe, capsys):
    path = tiny_recipe(teacher=None, distill={"epochs": 0, "loss": "ce"}, export={"exporter": "dynamo", "opset": 18},
                       quantize={"calibration_images": 5000})
    assert run(["compress", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: quantize.calibration_images is 5000 but the training split has 270 images; "
                   "set quantize.calibration_images: 270 or less"]


def test_quantize_stage_builds_measures_and_ships_or_keeps_float(tiny_recipe, tmp_path):
    """Real quantize_static on the tiny exported student; whichever way the measurement goes,
    what ships matches what the card and the bench say."""
    path = tiny_recipe(teacher=None, distill={"epochs": 1, "lr": 0.05, "loss": "ce"},
                       export={"exporter": "torchscript", "opset": 17, "references": False},
                       quantize={"candidates": ["qdq_u8s8_per_tensor", "qoperator_u8s8_per_tensor"],
                                 "calibration_images": 64, "time_per_model_s": 0.2, "max_accuracy_drop": 1.0,
                                 "min_speedup": 1.0},
                       bench={"batch_sizes": [1, 2], "warmup": 1, "iterations": 3, "time_budget_s": 0.1,
                              "compare_torch": False})
    assert run(["compress", str(path)]) == 0
    run_dir = tmp_path / "export" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    quantize, card = summary["stages"]["quantize"], json.loads((run_dir / "model_card.json").read_text())
    table = {row["name"]: row for row in quantize["info"]["candidates"]}
    assert set(table) == {"qdq_u8s8_per_tensor", "qoperator_u8s8_per_tensor"}
    for row in table.values():  # an INT8 file is smaller than the float one, and deflates
        assert 0 < row["sizes"]["zip_bytes"] <= row["sizes"]["bytes"] < summary["stages"]["export"]["metrics"]["onnx_file_size_bytes"]
    bench_models = json.loads((run_dir / "bench.json").read_text())["onnxruntime"]
    if quantize["metrics"]["int8.shipped"]:
        assert card["int8"]["shipped"] and card["int8"]["candidate"] == quantize["info"]["chosen"]
        assert (run_dir / "model_int8.onnx").is_file() and "int8" in bench_models
        assert min(table[card["int8"]["candidate"]]["speedup_vs_float"].values()) >= 1
        assert "int8.vs_student.pe_params" not in quantize["metrics"]  # no student reference without a teacher run
    else:
        assert not card["int8"]["shipped"] and not (run_dir / "model_int8.onnx").exists() and "int8" not in bench_models
    assert card["int8"]["cpu_features"]["machine"]
