"""Layers the model's own code depends on stay whole (prune/pinned.py).

ShuffleNetV2 (both engines): the channels a channel shuffle reorders stay, everything inside
the branches, the stem and the head is pruned, and the pruned model computes exactly what
the original computes with the removed channels zeroed. Vision Transformer: the token width
stays, the MLP hidden width is pruned (Torch-Pruning; NNI fails in one line)."""

import pytest
import torch
import torch.nn as nn
import torchvision

from toolchain.prune import prune_model
from toolchain.prune.pinned import pinned_layers
from toolchain.prune.registry import PruneError
from toolchain.recipe import PruneConfig


def shufflenet() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    for m in model.modules():  # distinct BN values: they tell which channels were kept
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight.data, m.bias.data, m.running_mean):
                t.copy_(torch.randn_like(t))
            m.running_var.uniform_(0.5, 2.0)
    return model


def zeroed_like(original: nn.Module, pruned: nn.Module) -> nn.Module:
    """The original with every channel the pruned model lost set to exactly 0 at its BN."""
    reference = shufflenet()
    reference.load_state_dict(original.state_dict())
    for name, bn in reference.named_modules():
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        kept = pruned.get_submodule(name).weight.data
        keep = torch.tensor([bool((kept == w).any()) for w in bn.weight.data])
        assert int(keep.sum()) == kept.numel(), name  # kept values are found once each
        bn.weight.data[~keep] = 0
        bn.bias.data[~keep] = 0
    return reference


def test_the_layers_around_each_shuffle_are_pinned():
    pins = pinned_layers(shufflenet())
    assert "stage2.0.branch2.5" in pins and "stage2.0.branch1.2" in pins
    assert "stage2.0.branch1.0" not in pins  # reads the stem, not a shuffle
    assert "stage3.0.branch1.0" in pins and "stage2.1.branch2.0" not in pins
    assert pinned_layers(torchvision.models.resnet18()) == []


@pytest.mark.parametrize("engine", ["nni", "torch_pruning"])
def test_shufflenet_v2_prunes_inside_the_branches_and_keeps_the_function(engine):
    original = shufflenet()
    x = torch.randn(2, 3, 32, 32)
    result = prune_model(original, PruneConfig(method="channel", sparsity=0.5, engine=engine), x)
    pruned = result.model.eval()
    assert result.report["macs_after"] < 0.6 * result.report["macs_before"]
    for name in pinned_layers(original):
        assert pruned.get_submodule(name).out_channels == original.get_submodule(name).out_channels
    assert (
        pruned.get_submodule("stage2.1.branch2.3").out_channels
        < original.get_submodule("stage2.1.branch2.3").out_channels
    )
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed_like(original, pruned)(x), rtol=1e-4, atol=1e-4)


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
    ).eval()


def test_vision_transformer_keeps_its_token_width_and_prunes_the_mlp():
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    assert pinned_layers(model)[0] == "conv_proj"
    result = prune_model(model, PruneConfig(method="channel", sparsity=0.5, engine="torch_pruning"), x)
    pruned = result.model.eval()
    assert pruned.conv_proj.out_channels == 64 and pruned.hidden_dim == 64
    assert [layer.mlp[0].out_features for layer in pruned.encoder.layers] == [64, 64]
    assert pruned(x).shape == (2, 10)


def test_vision_transformer_on_nni_fails_in_one_line():
    """NNI's speedup loses the LayerNorm width on token tensors: one line and the way out,
    from the check that the pruned model still runs."""
    with pytest.raises(
        PruneError,
        match=r"^prune: engine nni failed on VisionTransformer \(RuntimeError: .*try prune.engine: torch_pruning",
    ) as err:
        prune_model(tiny_vit(), PruneConfig(method="channel", sparsity=0.5, engine="nni"), torch.randn(2, 3, 32, 32))
    assert "\n" not in str(err.value)
