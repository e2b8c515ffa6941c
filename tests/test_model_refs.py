"""Model references (registry, torchvision/, timm/, package.module:callable), `weights:`, and
their errors: one line each, exit 2, before any training."""

import json
import subprocess
import sys
import textwrap
import urllib.error
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import yaml

from toolchain.errors import CheckpointError, RecipeError
from toolchain.models import resolve, weights
from toolchain.models.refs import build, library_models, parse
from toolchain.recipe import load_recipe, validate_dict

USER_MODULE = """
import torch.nn as nn

def build(num_classes, width=8):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

def broken(num_classes):
    raise ValueError("no such width")

def not_a_model(num_classes):
    return 42

VALUE = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch, request):
    """A user's model module on PYTHONPATH, under a name unique to the test (sys.modules caches imports)."""
    name = f"usernets_{abs(hash(request.node.nodeid))}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def one_line_error(fn, error=RecipeError):
    with pytest.raises(error) as info:
        fn()
    assert "\n" not in str(info.value) and info.value.exit_code == 2
    return str(info.value)


def student(**fields):
    return validate_dict({"name": "t", "student": fields, "distill": {"loss": "ce"}}).student


# ---------------------------------------------------------------- reference forms


def test_parse_every_form():
    assert parse("resnet18").kind == "registry"
    assert parse("torchvision/resnet18") == parse("torchvision/resnet18").__class__("torchvision", "resnet18")
    assert parse("timm/resnet18.a1_in1k").name == "resnet18.a1_in1k"
    ref = parse("pkg.nets:make.build")
    assert (ref.kind, ref.module, ref.attribute) == ("callable", "pkg.nets", "make.build")


def test_library_names_are_read_without_importing_the_libraries():
    """The source scan finds exactly what the libraries register."""
    import timm
    import torchvision

    assert library_models("torchvision") == set(torchvision.models.list_models(module=torchvision.models))
    assert library_models("timm") == set(timm.list_models())


def test_validating_references_imports_neither_torch_nor_timm():
    code = textwrap.dedent("""
        import sys
        from toolchain.recipe import StudentConfig
        for ref in ["resnet18", "torchvision/convnext_tiny", "timm/resnet18.a1_in1k", "os.path:join"]:
            StudentConfig(model=ref)
        StudentConfig(model="timm/resnet18", weights="pretrained")
        assert "torch" not in sys.modules and "timm" not in sys.modules, "imported"
    """)
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "ref, suggestion",
    [
        ("resnet19", "Did you mean 'resnet18'"),
        ("torchvision/resnet19", "did you mean torchvision/resnet18"),
        ("torchvision/convnext_tiy", "torchvision/convnext_tiny"),
        ("timm/convnext_atoo", "timm/convnext_atto"),
    ],
)
def test_unknown_names_list_close_matches(ref, suggestion):
    assert suggestion in one_line_error(lambda: student(model=ref))


def test_timm_pretrained_tag_is_accepted():
    assert student(model="timm/resnet18.a1_in1k", weights="pretrained").model == "timm/resnet18.a1_in1k"


@pytest.mark.parametrize(
    "ref, message",
    [
        ("nosuchpkg.nets:build", "cannot import 'nosuchpkg.nets'"),
        ("nosuchmodule:build", "module 'nosuchmodule' not found on PYTHONPATH or next to the recipe"),
        ("a:b:c", "package.module:callable"),
    ],
)
def test_bad_callable_references_fail_validation(ref, message):
    assert message in one_line_error(lambda: student(model=ref))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"model": "resnet18", "weights": "DEFAULT"}, "use a state_dict file"),
        ({"model": "torchvision/resnet18", "weights": "pretrained"}, "DEFAULT or an enum name"),
        ({"model": "timm/resnet18", "weights": "IMAGENET1K_V1"}, "use pretrained"),
        ({"model": "timm/resnet18", "cifar_stem": True}, "cifar_stem applies to registry models only"),
        ({"model": "resnet18", "kwargs": {"num_classes": 3}}, "kwargs cannot set num_classes"),
        ({"model": "resnet18", "weights": "a.pth", "checkpoint": "b.pt"}, "not both"),
    ],
)
def test_weights_and_kwargs_are_checked_against_the_reference(fields, message):
    assert message in one_line_error(lambda: student(**fields))


# ---------------------------------------------------------------- building


@pytest.mark.parametrize(
    "ref, kwargs",
    [
        ("mobilenet_v3_small", {}),
        ("torchvision/shufflenet_v2_x0_5", {}),
        ("timm/test_convnext", {"drop_rate": 0.1}),
    ],
)
def test_every_form_builds_a_module_with_the_dataset_classes(ref, kwargs):
    model = build(ref, 7, kwargs=kwargs).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_user_callable_gets_num_classes_and_kwargs(user_module):
    model = resolve.create(student(model=f"{user_module}:build", kwargs={"width": 4}), 5)
    assert model[0].out_channels == 4 and model[-1].out_features == 5


def test_user_module_next_to_the_recipe_is_importable(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "nextdoor_nets.py").write_text(USER_MODULE)
    path = folder / "recipe.yaml"
    path.write_text(
        yaml.safe_dump({"name": "t", "student": {"model": "nextdoor_nets:build"}, "distill": {"loss": "ce"}})
    )
    try:
        assert isinstance(resolve.create(load_recipe(path).student, 3), nn.Module)
    finally:
        sys.path.remove(str(folder.resolve()))


@pytest.mark.parametrize(
    "attribute, message",
    [
        ("buidl", "has no attribute 'buidl'. Did you mean"),
        ("broken", "building it raised ValueError: no such width"),
        ("not_a_model", "returned int, not a torch.nn.Module"),
        ("VALUE", "is a int, not a callable"),
    ],
)
def test_user_callable_errors_are_one_line(user_module, attribute, message):
    cfg = student(model=f"{user_module}:{attribute}")
    assert message in one_line_error(lambda: resolve.check_model(cfg, 10))


def test_user_module_that_fails_to_import_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "crashing_nets.py").write_text("import nosuchdependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = student(model="crashing_nets:build")
    assert "importing 'crashing_nets' failed: ModuleNotFoundError" in one_line_error(
        lambda: resolve.check_model(cfg, 10)
    )


def test_model_stage_preflight_checks_the_reference_before_training(user_module):
    from toolchain.stages.distill import Distill

    cfg = SimpleNamespace(student=student(model=f"{user_module}:broken"), distill=None)
    with pytest.raises(RecipeError, match="raised ValueError"):
        Distill().preflight(cfg, SimpleNamespace(num_classes=10))


def test_cli_exits_2_on_a_bad_reference(tmp_path, user_module):
    from toolchain.cli import run

    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump({"name": "t", "student": {"model": "torchvision/resnet19"}, "distill": {"loss": "ce"}})
    )
    assert run(["validate", str(path)]) == 2


# ---------------------------------------------------------------- weights


def save_imagenet_layout(path, ref):
    """A 1000-class state_dict of `ref` with random values (stands in for downloaded weights)."""
    torch.manual_seed(1)
    model = build(ref, 1000)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)
    return model.state_dict()


@pytest.mark.parametrize(
    "ref, suffix, head",
    [
        ("torchvision/mobilenet_v3_small", ".pth", "classifier.3"),
        ("timm/test_resnet", ".safetensors", "fc"),
    ],
)
def test_weights_file_loads_and_replaces_the_head(tmp_path, capsys, ref, suffix, head):
    path = tmp_path / f"w{suffix}"
    saved = save_imagenet_layout(path, ref)
    model = resolve.create(student(model=ref, weights=str(path)), 10)
    state = model.state_dict()
    assert state[f"{head}.weight"].shape[0] == 10
    assert all(torch.equal(state[k], v) for k, v in saved.items() if not k.startswith(f"{head}."))
    assert f"classifier {head} re-initialised for 10 classes (the file has 1000)" in capsys.readouterr().out


def test_weights_file_of_another_architecture_is_one_line(tmp_path):
    torch.save(build("resnet18", 1000).state_dict(), tmp_path / "w.pth")
    cfg = student(model="torchvision/resnet34", weights=str(tmp_path / "w.pth"))
    assert "does not fit architecture" in one_line_error(lambda: resolve.create(cfg, 10), CheckpointError)


def test_missing_weights_file_fails_preflight(tmp_path):
    cfg = student(model="resnet18", weights=str(tmp_path / "nope.pth"))
    assert "not found" in one_line_error(lambda: resolve.check_model(cfg, 10), CheckpointError)


def test_torchvision_enum_weights_replace_the_head(monkeypatch, capsys):
    """The enum's download is the library's; here it hands back a random 1000-class state_dict."""
    import torchvision.models._api as api

    monkeypatch.setattr(
        api, "load_state_dict_from_url", lambda *a, **k: build("torchvision/shufflenet_v2_x0_5", 1000).state_dict()
    )
    model = resolve.create(student(model="torchvision/shufflenet_v2_x0_5", weights="DEFAULT"), 10)
    assert model.fc.out_features == 10
    assert "classifier fc replaced by a new layer with 10 outputs (the weights have 1000)" in capsys.readouterr().out


def test_unknown_torchvision_enum_lists_the_members():
    cfg = student(model="torchvision/resnet50", weights="IMAGENET1K_V3")
    assert "IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT" in one_line_error(
        lambda: resolve.check_model(cfg, 10), CheckpointError
    )


@pytest.mark.parametrize("call", [resolve.create, resolve.check_model], ids=["create", "preflight"])
def test_offline_torchvision_download_says_which_file_to_put_where(monkeypatch, call):
    """The preflight's check_model tries the download too: offline fails before anything trains."""
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    cfg = student(model="torchvision/resnet50", weights="IMAGENET1K_V2")
    message = one_line_error(lambda: call(cfg, 10), CheckpointError)
    assert "put resnet50-11ad3fa6.pth" in message and "hub/checkpoints/resnet50-11ad3fa6.pth" in message


def test_offline_timm_download_says_which_file_to_put_where(monkeypatch):
    import timm
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm, "create_model", offline)
    message = one_line_error(
        lambda: resolve.create(student(model="timm/resnet18.a1_in1k", weights="pretrained"), 10), CheckpointError
    )
    assert "hf download timm/resnet18.a1_in1k" in message and "models--timm--resnet18.a1_in1k" in message


def test_unreachable_hub_fails_at_once_instead_of_retrying(monkeypatch):
    """No route to huggingface.co: the hub's offline mode answers from the cache at once (a miss
    fails in one line) instead of ~46 s of retries."""
    import timm
    from huggingface_hub import constants

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)

    def no_route(address, timeout=None):
        assert address == ("huggingface.co", 443) and timeout == 3.0
        raise OSError("Name or service not known")

    seen = []
    monkeypatch.setattr(weights.socket, "create_connection", no_route)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: seen.append(constants.HF_HUB_OFFLINE) or nn.Linear(1, 1))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    resolve.create(student(model="timm/resnet18.a1_in1k", weights="pretrained"), 10)
    assert seen == [True] and constants.HF_HUB_OFFLINE is False  # offline only for the call


def test_weights_preprocessing_comes_from_the_weights():
    tv = resolve.weights_preprocessing(student(model="torchvision/resnet50", weights="IMAGENET1K_V2"))
    assert tv == {
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "image_size": [224, 224],
        "crop_pct": round(224 / 232, 4),
        "interpolation": "bilinear",
    }
    tm = resolve.weights_preprocessing(student(model="timm/resnet18.a1_in1k", weights="pretrained"))
    assert tm["image_size"] == [224, 224] and tm["crop_pct"] == 0.95 and tm["interpolation"] == "bicubic"
    assert resolve.weights_preprocessing(student(model="resnet18")) is None
    assert resolve.weights_preprocessing(student(model="resnet18", weights="w.pth")) is None


def test_weights_identity_is_in_the_stage_key(tmp_path):
    from toolchain.stages.teacher import Teacher

    path = tmp_path / "w.pth"
    torch.save(build("resnet18", 10).state_dict(), path)
    cfg = SimpleNamespace(
        teacher=validate_dict(
            {"name": "t", "teacher": {"model": "resnet18", "weights": str(path)}, "student": {"model": "resnet18"}}
        ).teacher
    )
    first = Teacher().fingerprint(cfg)
    torch.save(build("resnet18", 10).state_dict(), path)
    assert Teacher().fingerprint(cfg) != first  # same path, other content
    default = resolve.weights_identity(student(model="torchvision/resnet50", weights="DEFAULT"))
    assert default.startswith("ResNet50_Weights.IMAGENET1K_V2")  # DEFAULT resolved: it moves between releases


# ---------------------------------------------------------------- recipes/pretrained.yaml


def test_pretrained_recipe_builds_both_models_from_local_weight_files(tmp_path):
    teacher_file, student_file = tmp_path / "resnet50.pth", tmp_path / "mnv3.pth"
    torch.save(build("torchvision/resnet50", 1000).state_dict(), teacher_file)
    torch.save(build("torchvision/mobilenet_v3_large", 1000).state_dict(), student_file)
    recipe = load_recipe(
        "recipes/pretrained.yaml", [f"teacher.weights={teacher_file}", f"student.weights={student_file}"]
    )
    assert recipe.teacher.model == "torchvision/resnet50" and recipe.student.model == "torchvision/mobilenet_v3_large"
    for section in (recipe.teacher, recipe.student):
        model = resolve.create(section, 5).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, 224, 224)).shape == (1, 5)
    as_written = load_recipe("recipes/pretrained.yaml")
    assert as_written.teacher.weights == "IMAGENET1K_V2" and as_written.student.weights == "DEFAULT"


# ---------------------------------------------------------------- end to end (slow)


def compress(tiny_recipe, tmp_path, **sections):
    from toolchain.cli import run

    path = tiny_recipe(**sections)
    assert run(["compress", str(path)]) == 0
    first = json.loads((tmp_path / "export" / "tiny" / "summary.json").read_text())
    assert run(["compress", str(path), "name=again"]) == 0  # every stage reused: models restored from artifacts
    again = json.loads((tmp_path / "export" / "again" / "summary.json").read_text())
    assert all(stage["cached"] for stage in again["stages"].values())
    return first, again


@pytest.mark.slow
def test_pipeline_with_a_user_factory_and_a_timm_teacher(tiny_recipe, tmp_path, user_module):
    first, again = compress(
        tiny_recipe,
        tmp_path,
        teacher={"model": "timm/test_resnet", "train": {"epochs": 1, "lr": 0.05}},
        student={"model": f"{user_module}:build", "kwargs": {"width": 16}},
        prune={"method": "channel", "sparsity": 0.5},
        finetune={"epochs": 1, "lr": 0.01, "loss": "kd"},
    )
    stages = first["stages"]
    assert stages["prune"]["metrics"]["params"] < stages["distill"]["metrics"]["params"]
    assert again["stages"]["finetune"]["metrics"] == stages["finetune"]["metrics"]


@pytest.mark.slow
def test_pipeline_prunes_and_restores_a_timm_convnext(tiny_recipe, tmp_path):
    """LayerNorm2d, depthwise 7x7 convs and layer-scale parameters: restored from shapes on reuse."""
    first, again = compress(
        tiny_recipe,
        tmp_path,
        teacher=None,
        student={"model": "timm/test_convnext"},
        distill={"epochs": 1, "lr": 0.01, "loss": "ce"},
        prune={"method": "channel", "sparsity": 0.5, "engine": "torch_pruning"},
    )
    stages = first["stages"]
    assert stages["prune"]["metrics"]["macs"] < 0.6 * stages["distill"]["metrics"]["macs"]
    assert again["stages"]["prune"]["metrics"] == stages["prune"]["metrics"]
