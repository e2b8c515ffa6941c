import pytest
import torch

from toolchain.errors import CheckpointError
from toolchain.models.checkpoint import load_weights, save_state
from toolchain.models.registry import build_model


def test_round_trip(tmp_path):
    model = build_model("cifar_resnet20", 10)
    save_state({"model": model.state_dict()}, tmp_path / "m.pt")
    fresh = load_weights(build_model("cifar_resnet20", 10), tmp_path / "m.pt")
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_bare_state_dict_is_accepted(tmp_path):
    model = build_model("cifar_resnet20", 10)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    load_weights(build_model("cifar_resnet20", 10), tmp_path / "m.pt")


def test_wrong_architecture(tmp_path):
    torch.save(build_model("cifar_resnet20", 10).state_dict(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="does not fit architecture 'resnet18'"):
        load_weights(build_model("resnet18", 10), tmp_path / "m.pt", "resnet18")


def test_truncated_file(tmp_path):
    torch.save(build_model("cifar_resnet20", 10).state_dict(), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_weights(build_model("cifar_resnet20", 10), tmp_path / "m.pt")


def test_pickled_full_model_is_refused(tmp_path):
    torch.save(build_model("cifar_resnet20", 10), tmp_path / "m.pt")  # the whole module, pickled
    with pytest.raises(CheckpointError, match="refused to load"):
        load_weights(build_model("cifar_resnet20", 10), tmp_path / "m.pt")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(build_model("cifar_resnet20", 10), tmp_path / "nope.pt")


def test_physically_smaller_layers_are_resized_on_load(tmp_path):
    """A channel-pruned student reloads into its registry architecture."""
    model = build_model("cifar_resnet20", 10)
    block = model.layer1[0]
    block.conv1 = torch.nn.Conv2d(16, 8, 3, 1, 1, bias=False)
    block.bn1 = torch.nn.BatchNorm2d(8)
    block.conv2 = torch.nn.Conv2d(8, 16, 3, 1, 1, bias=False)
    save_state({"model": model.state_dict()}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="layer1.0.conv1.weight"):  # a user's checkpoint: strict
        load_weights(build_model("cifar_resnet20", 10), tmp_path / "m.pt")
    fresh = load_weights(build_model("cifar_resnet20", 10), tmp_path / "m.pt", resize=True)
    assert fresh.layer1[0].conv1.out_channels == 8
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.eval()(x), fresh.eval()(x))


def test_a_checkpoint_with_another_head_is_refused_not_resized(tmp_path):
    """An ImageNet-style 1000-class head for a 10-class recipe: one line naming the tensors."""
    torch.save(build_model("cifar_resnet20", 1000).state_dict(), tmp_path / "imagenet.pt")
    with pytest.raises(CheckpointError) as err:
        load_weights(build_model("cifar_resnet20", 10), tmp_path / "imagenet.pt", "cifar_resnet20")
    message = str(err.value)
    assert "\n" not in message and "(1000, 64) in the file vs (10, 64) in the model" in message
    assert "same number of classes" in message


@pytest.mark.parametrize(
    "ref, engine",
    [
        ("timm/test_convnext", "torch_pruning"),  # LayerNorm2d, depthwise 7x7 convs, layer-scale parameters
        ("torchvision/regnet_x_400mf", "torch_pruning"),  # grouped (non-depthwise) convs
        ("torchvision/regnet_y_400mf", "nni"),  # grouped convs kept in equal blocks by the NNI engine, SE
        ("torchvision/shufflenet_v2_x0_5", "nni"),  # channel shuffles: pruned inside the branches only
        ("mobilenet_v3_small", "nni"),  # NNI speedup: depthwise convs, squeeze-excitation
    ],
)
def test_channel_pruned_models_of_any_architecture_restore_from_shapes(tmp_path, ref, engine):
    """A fresh build of the reference takes the pruned shapes (no pickled module) and computes the same."""
    from toolchain.models.refs import build
    from toolchain.prune import prune_model
    from toolchain.recipe import PruneConfig

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    pruned = prune_model(build(ref, 10), PruneConfig(method="channel", sparsity=0.5, engine=engine), x).model.eval()
    save_state({"model": pruned.state_dict()}, tmp_path / "m.pt")
    fresh = load_weights(build(ref, 10), tmp_path / "m.pt", ref, resize=True, example_input=x).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), pruned(x))
    assert sum(p.numel() for p in fresh.parameters()) < 0.6 * sum(p.numel() for p in build(ref, 10).parameters())


def test_pruned_grouped_convs_need_an_example_batch(tmp_path):
    def model(width=8):
        return torch.nn.Sequential(torch.nn.Conv2d(3, width, 1), torch.nn.Conv2d(width, width, 3, groups=width))

    save_state({"model": model(4).state_dict()}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="needs an example input batch"):
        load_weights(model(), tmp_path / "m.pt", resize=True)
    fresh = load_weights(model(), tmp_path / "m.pt", resize=True, example_input=torch.randn(1, 3, 8, 8))
    assert fresh[1].groups == 4 and fresh[1].in_channels == 4


def test_a_structure_that_cannot_be_rebuilt_is_one_line(tmp_path):
    small = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(6, 4, 3))  # 4 channels in, 6 expected
    save_state({"model": small.state_dict()}, tmp_path / "m.pt")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 3))
    with pytest.raises(CheckpointError, match="could not be rebuilt") as err:
        load_weights(model, tmp_path / "m.pt", resize=True, example_input=torch.randn(1, 3, 8, 8))
    assert "\n" not in str(err.value)
