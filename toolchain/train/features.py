"""Feature distillation by module path: forward hooks read named modules of student and teacher.

Hooks need no change to the model, so torchvision, timm, user and pruned models all work.
Shapes are probed with one forward at the data's input shape, and an adapter per term maps
the student's feature onto the teacher's: 1x1 conv + BN where channel counts differ (mse
only; attention maps are channel-free), adaptive average pooling of the larger map to the
smaller one where sizes differ. Adapters train with the student but belong to the task,
not the model, so export, checkpoints and parameter counts never see them.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import RecipeError
from . import ddp as dist


def find_module(model: nn.Module, path: str, where: str) -> nn.Module:
    """model's submodule at `path` (named_modules() spelling), or a one-line error with close matches."""
    modules = dict(dist.unwrap(model).named_modules())
    if path and path in modules:
        return modules[path]
    close = difflib.get_close_matches(path, [n for n in modules if n], n=3, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}" if close else f"e.g. {', '.join(list(modules)[1:4])}"
    raise RecipeError(
        f"{where}: no module {path!r} in the model ({hint}); give a path as printed by model.named_modules()"
    )


def _tensor_of(output) -> torch.Tensor:
    """A module's output as one tensor (blocks that return tuples give their first item)."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    return output


def _as_map(feature: torch.Tensor) -> torch.Tensor:
    """(B, C) vectors and (B, C, L) sequences as (B, C, H, W) maps, so one adapter kind serves all."""
    while feature.dim() < 4:
        feature = feature.unsqueeze(-1)
    return feature


@contextmanager
def tapped(model: nn.Module, paths: Sequence[str]):
    """Collect the outputs of the modules at `paths` during the with-block; hooks removed after."""
    found: Dict[str, torch.Tensor] = {}
    handles = []
    for path in paths:
        module = dist.unwrap(model).get_submodule(path)
        handles.append(
            module.register_forward_hook(lambda m, i, out, path=path: found.__setitem__(path, _tensor_of(out)))
        )
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def probe(model: nn.Module, paths: Sequence[str], input_shape: Tuple[int, ...]) -> Dict[str, torch.Size]:
    """Feature shapes at `paths` from one eval-mode forward of a batch of 2 at input_shape."""
    device = next(dist.unwrap(model).parameters()).device
    was_training = model.training
    model.eval()
    try:
        with tapped(model, paths) as found:
            model(torch.zeros(2, *input_shape, device=device))
    finally:
        model.train(was_training)
    return {path: _as_map(found[path]).shape for path in paths}


class Adapter(nn.Module):
    """Maps a student feature map onto its teacher's: pool the larger map, 1x1 conv + BN for channels."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size, match_channels: bool):
        super().__init__()
        self.size = tuple(min(s, t) for s, t in zip(student_shape[2:], teacher_shape[2:]))
        cs, ct = student_shape[1], teacher_shape[1]
        self.project = (
            nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct))
            if match_channels and cs != ct
            else nn.Identity()
        )

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.project(self._pool(_as_map(student))), self._pool(_as_map(teacher))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x if tuple(x.shape[2:]) == self.size else F.adaptive_avg_pool2d(x, self.size)


def attention(x: torch.Tensor) -> torch.Tensor:
    """Attention map of Zagoruyko & Komodakis (2017): channel mean of squares, flattened, unit norm."""
    return F.normalize(x.pow(2).mean(1).flatten(1), dim=1)


FEATURE_LOSSES = {
    "mse": F.mse_loss,
    "at": lambda s, t: (attention(s) - attention(t)).pow(2).mean(),
}


class FeatureDistiller(nn.Module):
    """The feature terms of one training: specs (recipe FeatureConfig) and one adapter each."""

    def __init__(self, specs, student: nn.Module, teacher: nn.Module, input_shape, section: str):
        super().__init__()
        self.specs = list(specs)
        for i, spec in enumerate(self.specs):
            find_module(student, spec.student, f"{section}.features[{i}].student")
            find_module(teacher, spec.teacher, f"{section}.features[{i}].teacher")
        s_shapes = probe(student, [s.student for s in self.specs], input_shape)
        t_shapes = probe(teacher, [s.teacher for s in self.specs], input_shape)
        device = next(dist.unwrap(student).parameters()).device
        self.adapters = nn.ModuleList(
            Adapter(s_shapes[spec.student], t_shapes[spec.teacher], match_channels=spec.loss == "mse")
            for spec in self.specs
        ).to(device)

    def student_paths(self) -> List[str]:
        return [s.student for s in self.specs]

    def teacher_paths(self) -> List[str]:
        return [s.teacher for s in self.specs]

    def terms(self, student_feats: Dict[str, torch.Tensor], teacher_feats: Dict[str, torch.Tensor]):
        """{"feat.<i>": weighted loss} for each spec, from the tapped features."""
        out = {}
        for i, (spec, adapter) in enumerate(zip(self.specs, self.adapters)):
            s, t = adapter(student_feats[spec.student], teacher_feats[spec.teacher].detach())
            out[f"feat.{i}"] = spec.weight * FEATURE_LOSSES[spec.loss](s, t.to(s.dtype))
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
