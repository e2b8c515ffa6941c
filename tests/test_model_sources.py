"""CONTRIBUTING.md's "add a model source", followed once: a toy source (`toy/<name>`) is ONE class,
written and registered here and nothing else edited. The recipe schema accepts `student.model:
toy/tiny`, resolve builds it (local weight files included), the pipeline trains and restores it,
`python -m toolchain list sources` shows it, and a mistyped prefix is a one-line error listing
every source. Counted: a model source is 1 file; no module outside sources.py names a source."""

import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from test_model_refs import one_line_error, student  # the same helpers as the reference tests

from toolchain.cli import run
from toolchain.models import resolve
from toolchain.models.refs import build, parse
from toolchain.models.sources import SOURCES, ModelSource, Reference, register_source

PACKAGE = Path(__file__).resolve().parent.parent / "toolchain"


class ToySource(ModelSource):
    """toy/<name>: two tiny nets; no library weights (so `weights:` is a state_dict file or nothing)."""

    name, prefix, form = "toy", "toy/", "toy/<name>"
    widths = {"tiny": 4, "small": 8}

    def check(self, ref):  # recipe validation: no torch here
        if ref.name not in self.widths:
            raise ValueError(f"unknown toy model {ref.name!r}; valid: {', '.join(self.widths)}")

    def build(self, ref, num_classes, cifar_stem, kwargs):
        width = kwargs.get("width", self.widths[ref.name])
        return nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, num_classes),
        )


@pytest.fixture
def toy_source(monkeypatch):
    """The toy registered as sources.py registers its classes (register_source, called here instead of
    decorating the class so that it can be undone), into a copy of the registry's entries that
    monkeypatch puts back after the test."""
    monkeypatch.setattr(SOURCES, "_entries", dict(SOURCES._entries))
    register_source(ToySource)


def test_a_toy_source_is_validated_built_and_listed(toy_source, tmp_path, capsys):
    cfg = student(model="toy/tiny", kwargs={"width": 6})
    assert cfg.model == "toy/tiny" and parse("toy/tiny") == Reference("toy", "tiny")
    model = resolve.create(cfg, 5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert model[0].out_channels == 6  # the section's kwargs reach the source's build
    resolve.check_model(cfg, 5, example=torch.randn(2, 3, 32, 32))  # the preflight's checks hold
    assert resolve.weights_identity(cfg) is None and resolve.weights_preprocessing(cfg) is None

    path = tmp_path / "toy.pth"
    torch.save(build("toy/small", 5).state_dict(), path)
    loaded = resolve.create(student(model="toy/small", weights=str(path)), 5)
    assert all(torch.equal(v, torch.load(path)[k]) for k, v in loaded.state_dict().items())

    assert run(["list", "sources"]) == 0
    assert capsys.readouterr().out.strip() == "sources: callable, registry, timm, torchvision, toy"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"model": "toy/huge"}, "unknown toy model 'huge'; valid: tiny, small"),
        ({"model": "toy/tiny", "weights": "pretrained"}, "use a state_dict file"),
        ({"model": "toy/tiny", "cifar_stem": True}, "cifar_stem applies to registry models only"),
        (
            {"model": "toi/tiny"},
            "model 'toi/tiny': unknown model source 'toi/'. Did you mean 'toy/'? Valid: torchvision/<name>, "
            "timm/<name>, toy/<name>, package.module:callable, a registered name (python -m toolchain list models)",
        ),
        ({"model": "resnet19"}, "; or use torchvision/<name>, timm/<name>, toy/<name>, package.module:callable"),
    ],
)
def test_the_toy_source_errors_are_one_line(toy_source, fields, message):
    assert message in one_line_error(lambda: student(**fields))


def test_the_toy_source_trains_and_is_restored_in_the_pipeline(toy_source, tiny_recipe, tmp_path):
    path = tiny_recipe(teacher=None, student={"model": "toy/tiny"}, distill={"epochs": 1, "lr": 0.05, "loss": "ce"})
    assert run(["compress", str(path)]) == 0
    assert run(["compress", str(path), "name=again"]) == 0  # reused: the model rebuilt from its reference
    first, again = (json.loads((tmp_path / "export" / n / "summary.json").read_text()) for n in ("tiny", "again"))
    assert again["stages"]["distill"]["cached"]
    assert again["stages"]["distill"]["metrics"] == first["stages"]["distill"]["metrics"]


def test_the_toy_source_is_gone_after_its_tests():
    assert "toy" not in SOURCES
    assert "unknown model source 'toy/'" in one_line_error(lambda: student(model="toy/tiny"))


def test_no_module_outside_sources_names_a_source():
    """The tagged union is gone: no `kind == "timm"`, `kind in (...)` or SOURCES.get("timm") outside
    sources.py, so a new source is one class there (or in the file that registers it)."""
    names = set(SOURCES.names())
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "sources.py" and path.parent.name == "models":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                kind = any(
                    isinstance(s, ast.Attribute) and s.attr == "kind" or getattr(s, "id", "") == "kind" for s in sides
                )
                values = {
                    e.value
                    for s in sides
                    for e in (s.elts if isinstance(s, (ast.Tuple, ast.List, ast.Set)) else [s])
                    if isinstance(e, ast.Constant)
                }
                if kind and values & names:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "get":
                if getattr(node.func.value, "id", "") == "SOURCES" and node.args:
                    if isinstance(node.args[0], ast.Constant) and node.args[0].value in names:
                        found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not found, f"a source named outside sources.py: {', '.join(found)}"
