"""The NNI 3.0 <-> torch 2.14 / Python 3.11 shim (toolchain/prune/nni_compat.py).

If NNI's ModelSpeedup stops working on this stack, these tests fail first. The
`unpatched` tests document that the shim is still needed: when a torch/NNI upgrade
makes them fail, the matching part of the shim can go.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torchvision.ops import StochasticDepth

from toolchain.prune import nni_compat
from toolchain.prune.speedup import speedup

pytestmark = pytest.mark.usefixtures("one_thread")  # NNI tracing on 2 shared cores: one thread is faster


class TinyResNet(nn.Module):
    """conv -> residual block (with EfficientNet's StochasticDepth on the branch) -> fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.drop = StochasticDepth(0.2, "row")
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        x = torch.relu(x + self.drop(y))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def inner_mask(model):
    """Mask half of conv1's filters (the inner channels of the block)."""
    mask = torch.ones(16, 1, 1, 1)
    mask[::2] = 0
    return {"conv1": {"weight": mask.expand_as(model.conv1.weight).clone()}}


def test_speedup_of_a_tiny_resnet_works_with_the_shim():
    torch.manual_seed(0)
    model, x = TinyResNet(), torch.randn(2, 3, 32, 32)
    speedup(model, inner_mask(model), x)
    assert model.conv1.out_channels == 8 and model.conv2.in_channels == 8 and model.bn1.num_features == 8
    assert model(x).shape == (2, 10)


def test_unpatched_speedup_still_breaks():
    """Documents why the shim exists (on torch 2.14 / Python 3.11)."""
    from nni.compression.speedup import ModelSpeedup

    nni_compat.import_nni_quietly()
    model = TinyResNet().eval()
    with nni_compat.quiet(), pytest.raises((AttributeError, TypeError, IndexError)):
        ModelSpeedup(model, torch.randn(2, 3, 32, 32), inner_mask(model)).speedup_model()


def test_patch_is_reversible_and_nests():
    from nni.common.concrete_trace_utils import concrete_proxy, concrete_tracer
    from nni.compression.speedup.replacement import replace_module

    nni_compat.import_nni_quietly()
    table = concrete_tracer.ConcreteTracer.default_autowrap_leaf_function
    before = (
        len(table),
        concrete_tracer.node_is_impure_wrapper,
        concrete_proxy.dis,
        concrete_proxy.ConcreteProxy.jump_opcodes,
        replace_module["Conv2d"],
    )
    with nni_compat.patched():
        patched_state = (len(table), concrete_tracer.node_is_impure_wrapper)
        with nni_compat.patched():  # nested: no double patching
            assert (len(table), concrete_tracer.node_is_impure_wrapper) == patched_state
        assert nni_compat.is_patched() and patched_state[0] < before[0]
        assert replace_module["Conv2d"] is not before[-1]  # conv_replace's, while patched
        # torch 2.14 calls Node.is_impure(impure_random); the wrapper must accept it
        assert patched_state[1].__code__.co_flags & 0x04  # *args
    assert not nni_compat.is_patched()
    after = (
        len(table),
        concrete_tracer.node_is_impure_wrapper,
        concrete_proxy.dis,
        concrete_proxy.ConcreteProxy.jump_opcodes,
        replace_module["Conv2d"],
    )
    assert after == before


def test_patch_restores_even_when_speedup_fails():
    from nni.common.concrete_trace_utils import concrete_tracer

    nni_compat.import_nni_quietly()
    wrapper = concrete_tracer.node_is_impure_wrapper
    with pytest.raises(RuntimeError):
        with nni_compat.patched():
            raise RuntimeError("boom")
    assert concrete_tracer.node_is_impure_wrapper is wrapper and not nni_compat.is_patched()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="inline caches are new in 3.11")
def test_code_unit_instruction_table_matches_f_lasti():
    import dis

    def probe():
        return sys._getframe().f_lasti

    code = probe.__code__
    table = nni_compat._CodeUnitDis.get_instructions(code)
    for inst in dis.get_instructions(code):
        assert table[inst.offset // 2] is not None and table[inst.offset // 2].offset == inst.offset


def test_pruning_prints_nothing():
    """A fresh process (NNI's import-time handlers included) prints nothing while pruning."""
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from toolchain.models.registry import build_model\n"
        "from toolchain.prune import prune_model\n"
        "from toolchain.recipe import PruneConfig\n"
        "for method in ('channel', 'weight'):\n"
        "    prune_model(build_model('cifar_resnet20', 10), PruneConfig(method=method), torch.randn(2, 3, 32, 32))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def _bn_zero_preserving(model):
    """Random BN statistics with BN(0) == 0, so a masked channel stays exactly zero
    downstream and the masked model is the function the smaller model must compute."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.copy_(m.bias * (m.running_var + m.eps).sqrt() / m.weight)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, (2.0 / m.weight[0].numel()) ** 0.5)


@pytest.mark.parametrize(
    "name",
    [
        "cifar_resnet20",
        "mobilenet_v3_small",
        "torchvision/regnet_y_400mf",
        pytest.param("efficientnet_b0", marks=pytest.mark.slow),
    ],
)
def test_speedup_computes_exactly_what_the_masks_say(name):
    """The physically smaller model equals the masked model (float64; NNI rebuilds
    layers in float32, hence the 1e-5 relative tolerance)."""
    import copy

    from toolchain.models.refs import build
    from toolchain.prune.channel import channel_masks, nni_config
    from toolchain.prune.dependency import channel_groups
    from toolchain.prune.targets import out_channels, select_targets

    torch.manual_seed(0)
    model, x = build(name, 10).eval().double(), torch.randn(2, 3, 32, 32).double()
    _bn_zero_preserving(model)
    targets = select_targets(model, ["Conv2d", "Linear"], [], False)
    groups, blocks = channel_groups(model, x, targets, True)  # regnet: grouped convs (blocks) and SE
    original = {n: out_channels(m) for n, m in targets.items()}
    masks = channel_masks(model, nni_config(model, groups, original, 0.5, 8, blocks), "L1NormPruner")
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for layer, tensors in masks.items():
            for attr, mask in tensors.items():
                if getattr(masked.get_submodule(layer), attr) is not None:
                    getattr(masked.get_submodule(layer), attr).mul_(mask.to(torch.float64))
        expected = masked(x)
        speedup(model, masks, x)
        got = model(x)
    assert sum(p.numel() for p in model.parameters()) < 0.5 * sum(p.numel() for p in masked.parameters())
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def _conv_masks(conv, kept_in, kept_out):
    """NNI's replacer arguments for a conv keeping these input / output channels."""
    in_mask = torch.zeros(2, conv.in_channels, 5, 5)
    in_mask[:, kept_in] = 1
    out_mask = torch.zeros(2, conv.out_channels, 5, 5)
    out_mask[:, kept_out] = 1
    weight_mask = torch.zeros_like(conv.weight)
    weight_mask[kept_out] = 1
    return [in_mask], out_mask, {"weight": weight_mask}


@pytest.mark.parametrize(
    "cin, cout, groups, kept_in, kept_out",
    [
        (16, 24, 1, [0, 3, 4, 9, 15], [1, 2, 5, 7, 20, 23]),  # plain: any channels
        (16, 16, 16, [0, 2, 3, 8, 15], [0, 2, 3, 8, 15]),  # depthwise: the same channels
        (8, 16, 4, [0, 5, 6], [0, 2, 9, 11, 12, 15]),  # grouped (2 -> 4 per group), group 1 gone
        (8, 16, 4, [0, 2, 4, 7], [0, 5, 9, 13]),  # grouped: one of each per group
    ],
)
def test_the_loop_free_conv_replacement_builds_what_nnis_builds(cin, cout, groups, kept_in, kept_out):
    from nni.compression.speedup import replacement

    from toolchain.prune.conv_replace import replace_conv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1, groups=groups, bias=True)
    masks = _conv_masks(conv, kept_in, kept_out)
    with torch.no_grad():
        expected, got = replacement.replace_conv2d(conv, masks), replace_conv2d(conv, masks)
    assert repr(got) == repr(expected) and got.groups == expected.groups
    assert torch.equal(got.weight, expected.weight) and torch.equal(got.bias, expected.bias)


@pytest.mark.parametrize(
    "kept_in, kept_out, error",
    [
        ([0, 2, 3, 4], [0, 1, 4, 5, 6, 8], "UnBalancedGroupError"),  # 2 inputs kept in group 1, 1 elsewhere
        ([], [0, 1], "EmptyLayerError"),
        ([0, 2], [], "EmptyLayerError"),
    ],
)
def test_the_loop_free_conv_replacement_refuses_what_nni_refuses(kept_in, kept_out, error):
    from nni.compression.speedup import replacement

    from toolchain.prune.conv_replace import replace_conv2d

    conv = nn.Conv2d(8, 16, 3, groups=4)
    masks = _conv_masks(conv, kept_in, kept_out)
    for replace in (replacement.replace_conv2d, replace_conv2d):
        with pytest.raises(Exception) as caught, torch.no_grad():
            replace(conv, masks)
        assert type(caught.value).__name__ == error, replace
