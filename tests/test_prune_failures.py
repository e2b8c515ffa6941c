"""An architecture the pruning engine cannot handle fails before anything trains, in one
line that names the layer and the way out (prune.exclude, the other engine); a hang is cut
by prune.check_time_limit_s; prune.exclude then lets the run go on."""

import re
import sys
import textwrap
import time

import pytest
import torch
import torch.nn as nn
import yaml

from toolchain.cli import run
from toolchain.prune import api
from toolchain.prune.registry import PruneError
from toolchain.recipe import PruneConfig


class Small(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.fc(x.mean((2, 3)))


def failing_on(layer: str, real=api.nni_channel_step):
    """An engine step that fails the way engines do (an exception deep inside, the layer in a
    local) whenever `layer` is being pruned, and prunes normally otherwise."""

    def step(model, groups, original, sparsity, *args):
        if any(layer in group for group in groups):
            module = model.get_submodule(layer)  # noqa: F841 (what the engine was working on)
            raise RuntimeError(f"unsupported op after {type(module).__name__}\nsecond line of the engine's message")
        return real(model, groups, original, sparsity, *args)

    return step


def test_an_engine_exception_becomes_one_line_naming_the_layer(monkeypatch):
    monkeypatch.setattr(api, "nni_channel_step", failing_on("b"))
    with pytest.raises(PruneError) as info:
        api.prune_model(Small(), PruneConfig(method="channel", sparsity=0.5), torch.randn(2, 3, 16, 16))
    message = str(info.value)
    assert "\n" not in message and "second line" not in message
    assert "engine nni failed on Small at layer b (RuntimeError: unsupported op after Conv2d)" in message
    assert "prune.exclude: ['b']" in message and "prune.engine: torch_pruning" in message


def test_exclude_lets_the_run_go_on(monkeypatch):
    monkeypatch.setattr(api, "nni_channel_step", failing_on("b"))
    result = api.prune_model(
        Small(), PruneConfig(method="channel", sparsity=0.5, exclude=["b"]), torch.randn(2, 3, 16, 16)
    )
    assert result.model.b.out_channels == 16 and result.report["macs_after"] < result.report["macs_before"]


def test_a_hanging_engine_is_cut_by_the_time_limit(monkeypatch):
    monkeypatch.setattr(api, "nni_channel_step", lambda *a: time.sleep(30))
    started = time.perf_counter()
    with pytest.raises(PruneError, match=r"did not finish pruning Small within 0.5 s \(prune.check_time_limit_s\)"):
        api.check_prunable(Small(), PruneConfig(method="channel", sparsity=0.5), torch.randn(2, 3, 16, 16), 0.5)
    assert time.perf_counter() - started < 10
    monkeypatch.undo()
    api.check_prunable(
        Small(), PruneConfig(method="channel", sparsity=0.5), torch.randn(2, 3, 16, 16), 60
    )  # alarm restored


def test_an_engine_limit_fails_in_the_preflight_before_training(tiny_recipe, tmp_path, capsys, monkeypatch):
    """A real engine limit: NNI cannot score a channel group that mixes convs with a channels-last
    Linear (a ConvNeXt-style block; the layer named is any member of that group). The user's model
    (package.module:callable) fails before the teacher trains, naming the layer."""
    (tmp_path / "layer_scale_models.py").write_text(
        textwrap.dedent("""
        import torch
        import torch.nn as nn

        class Block(nn.Module):
            def __init__(self, c):
                super().__init__()
                self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
                self.norm = nn.LayerNorm(c)
                self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
                self.scale = nn.Parameter(torch.full((c, 1, 1), 1e-6))

            def forward(self, x):
                y = self.fc2(nn.functional.gelu(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
                return x + self.scale * y.permute(0, 3, 1, 2)

        def build(num_classes):
            return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Block(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(16, num_classes))
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tiny_recipe(
        student={"model": "layer_scale_models:build"},
        prune={"method": "channel", "sparsity": 0.5},
        finetune={"epochs": 1, "loss": "kd"},
    )
    code = run(["compress", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    # a known NNI limit: the line says why and points to the other engine, not to excluding layers one by one
    assert re.search(
        r"engine nni cannot prune Sequential at layer (0|1\.dw|1\.fc2): its coupled channels mix Conv2d and "
        r"channels-last Linear layers .*; set prune.engine: torch_pruning$",
        err.strip(),
    ), err
    assert not list((tmp_path / "export" / ".cache").glob("teacher-*"))  # nothing trained
    sys.modules.pop("layer_scale_models", None)

    recipe = yaml.safe_load(path.read_text())
    recipe["prune"]["engine"] = "torch_pruning"  # the way out the line names
    recipe["data"].update(subset=96, test_subset=32)
    path.write_text(yaml.safe_dump(recipe))
    assert run(["compress", str(path)]) == 0
    assert (
        "[prune] preflight: layer_scale_models:build channel-prunes with engine torch_pruning"
        in capsys.readouterr().out
    )
