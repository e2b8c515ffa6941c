"""prune_model: the one entry point the pipeline calls.

    result = prune_model(model, cfg, example_input, finetune_fn=None, gradients=None)

The input model is left untouched; result.model is a pruned copy made of plain torch
modules (no NNI wrappers): channel pruning physically removes channels (NNI
ModelSpeedup or Torch-Pruning), weight pruning leaves real zeros in dense weights
and returns result.after_step to keep them zero during fine-tuning.
"""

from __future__ import annotations

import copy
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..metrics import count_macs, count_nonzero_params, count_params
from . import layers as layer_stats
from .channel import nni_channel_step
from .dependency import channel_groups
from .pinned import has_channel_shuffle, pinned_layers
from .registry import PruneError, PrunerSpec, check_fit
from .schedule import FinetuneFn, run_schedule, sparsity_steps
from .targets import out_channels, select_targets
from .taylor import GradientSource
from .tp_engine import tp_stepper
from .weight import level_step

Number = Union[int, float, str]


@dataclass
class PruneResult:
    model: nn.Module
    report: Dict[str, Number]
    layers: List[Dict[str, Number]] = field(default_factory=list)
    after_step: Optional[Callable[[], None]] = None


def prune_model(
    model: nn.Module,
    cfg,
    example_input: torch.Tensor,
    finetune_fn: Optional[FinetuneFn] = None,
    gradients: Optional[GradientSource] = None,
    kept: Optional[Dict[str, int]] = None,
) -> PruneResult:
    """Prune a copy of `model` as `cfg` (a PruneConfig) says; see the module doc.

    `gradients` (training batches + loss) is what the `taylor` pruner scores with. `kept` (channel
    method, engine nni): the kept channels of each dependency group, keyed by its first member
    (latency_aware allocation, costmodel.py); cfg.sparsity is then not used, and an iterative
    schedule ramps every group towards its own count.
    """
    spec = check_fit(cfg.method, cfg.pruner, cfg.engine, cfg.scope)
    started = time.perf_counter()
    model = copy.deepcopy(model)
    # Channel pruning never removes class outputs, whatever prune_classifier says.
    targets = select_targets(model, cfg.op_types, cfg.exclude, cfg.prune_classifier and cfg.method == "weight")
    pinned = set(pinned_layers(model)) if cfg.method == "channel" else set()
    targets = {name: m for name, m in targets.items() if name not in pinned}
    names = list(targets)
    before = _totals(model, example_input)
    shapes_before = layer_stats.snapshot(model, names)
    sparsities = sparsity_steps(1.0 if kept else cfg.sparsity, cfg.schedule, cfg.steps)
    with engine_failures(cfg, model, names):
        prune_step = _stepper(
            model, cfg, spec, targets, sparsities, example_input, gradients, has_channel_shuffle(model), kept
        )
        after_step = run_schedule(sparsities, prune_step, lambda: model, finetune_fn, cfg.step_epochs)
        after = _totals(model, example_input)  # runs the pruned model: one that no longer runs failed here too
    layers = layer_stats.compare(cfg.method, shapes_before, layer_stats.snapshot(model, names))
    report = _report(cfg, before, after, layers, time.perf_counter() - started)
    if kept:  # no one sparsity was asked for: each group has its own
        report["sparsity_target"] = report["sparsity_achieved"]
    return PruneResult(
        model=model, report=report, layers=layers, after_step=after_step if cfg.method == "weight" else None
    )


def check_prunable(model: nn.Module, cfg, example_input: torch.Tensor, time_limit_s: float) -> float:
    """Prune a copy of the (untrained) model once, as the recipe will after training, and
    return the seconds it took: an architecture the engine cannot handle fails here, in
    one line, before anything trains. Channels are scored by L1 (structure, not scores,
    is what can fail), iterative schedules by their first step; weight pruning cannot fail
    on structure and is not run."""
    if cfg.method != "channel":
        return 0.0
    trial = cfg.model_copy(update={"pruner": "l1" if cfg.pruner == "taylor" else cfg.pruner, "schedule": "one_shot"})
    started = time.perf_counter()
    with check_time_limit(cfg, model, time_limit_s):
        prune_model(model, trial, example_input)
    return time.perf_counter() - started


def check_time_limit(cfg, model: nn.Module, time_limit_s: float):
    """The preflight's limit on one engine run, and the one line when it is exceeded."""
    return time_limit(
        time_limit_s,
        lambda: PruneError(
            f"prune: engine {cfg.engine} did not finish pruning {type(model).__name__} within {time_limit_s:g} s "
            f"(prune.check_time_limit_s); try prune.engine: {_other(cfg)}, keep the blocks it stalls on with prune.exclude, "
            "or raise prune.check_time_limit_s if the model is just big"
        ),
    )


@contextmanager
def engine_failures(cfg, model: nn.Module, targets: List[str]):
    """An engine's own exception (a shape it cannot trace, an op it does not know) -> one PruneError
    line naming the target layer it was working on and the two ways out."""
    try:
        yield
    except (PruneError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        layer = _failing_layer(exc.__traceback__, model, set(targets))
        where = f" at layer {layer}" if layer else ""
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        known = KNOWN_LIMITS.get(_innermost_function(exc.__traceback__))
        if known:  # excluding layers one by one would not get past it
            raise PruneError(
                f"prune: engine {cfg.engine} cannot prune {type(model).__name__}{where}: {known} "
                f"({type(exc).__name__}: {first}); set prune.engine: {_other(cfg)}"
            ) from exc
        raise PruneError(
            f"prune: engine {cfg.engine} failed on {type(model).__name__}{where} "
            f"({type(exc).__name__}: {first}); {_way_out(cfg, layer)}"
        ) from exc


# Engine failures whose cause is known, by the engine function they end in (measured on the zoo, docs/zoo.md).
KNOWN_LIMITS = {
    # NNI adds a group's filter scores as tensors: a Conv2d's [C,1,1,1] and a Linear's [C,1] broadcast
    "_metric_fuse": "its coupled channels mix Conv2d and channels-last Linear layers (ConvNeXt, Swin, MaxViT blocks), "
    "whose scores NNI cannot combine",
}


def _innermost_function(tb) -> Optional[str]:
    name = None
    while tb is not None:
        name, tb = tb.tb_frame.f_code.co_name, tb.tb_next
    return name


def _other(cfg) -> str:
    return "torch_pruning" if cfg.engine == "nni" else "nni"


def _way_out(cfg, layer: Optional[str]) -> str:
    if layer:
        return f"keep that layer with prune.exclude: ['{layer}'] (fnmatch patterns), or try prune.engine: {_other(cfg)}"
    return f"try prune.engine: {_other(cfg)}, or keep the layers it fails on with prune.exclude (fnmatch patterns)"


def _failing_layer(tb, model: nn.Module, targets: set) -> Optional[str]:
    """The innermost frame's pruning target (a module, or its name, in a local variable): engines
    keep the layer they work on in a local; the name is a hint, not a guarantee."""
    names = {id(m): n for n, m in model.named_modules() if n in targets}
    found = None
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, nn.Module) and id(value) in names:
                found = names[id(value)]
            elif isinstance(value, str) and value in targets:
                found = value
        tb = tb.tb_next
    return found


@contextmanager
def time_limit(seconds: float, error: Callable[[], Exception]):
    """Raise error() if the block runs longer than `seconds` (main thread of a Unix process; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise error()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _stepper(
    model, cfg, spec: PrunerSpec, targets, sparsities, example_input, gradients, shuffles: bool, kept=None
) -> Callable[[float], Optional[Callable]]:
    """prune_step(sparsity) for the engine the recipe names (never chosen silently); `shuffles`:
    the model has known channel shuffles, whose neighbours are pinned (pinned.py). With `kept`, the
    steps' sparsities are the fraction of the way to each group's kept count."""
    if cfg.method == "weight":
        return lambda s: level_step(model, {n: model.get_submodule(n) for n in targets}, s, cfg.scope)
    if cfg.engine == "torch_pruning":
        return tp_stepper(
            model,
            targets,
            sparsities,
            spec.engines["torch_pruning"],
            cfg.align,
            cfg.dependency_aware,
            example_input,
            shuffles,
            _kept_ratios(model, example_input, targets, cfg, kept) if kept else None,
        )
    groups, blocks = _groups(model, example_input, targets, cfg.dependency_aware)
    original = {name: out_channels(m) for name, m in targets.items()}

    def step(sparsity: float) -> None:
        if kept:  # each group its own share of the way: sparsity is the progress here
            sparsity = {g[0]: sparsity * (1 - kept.get(g[0], original[g[0]]) / original[g[0]]) for g in groups}
        nni_channel_step(
            model, groups, original, sparsity, cfg.align, spec.engines["nni"], example_input, gradients, blocks
        )

    return step


def _kept_ratios(model, example_input, targets, cfg, kept: Dict[str, int]) -> Dict[str, float]:
    """Torch-Pruning's per-layer ratio for each member of a group with a kept count (the groups as the
    cost model forms them, keyed by their first member). Half a channel below the kept count, because
    Torch-Pruning keeps int(channels * (1 - ratio)) and a float landing just under it would cost a
    whole alignment step."""
    groups, _ = _groups(model, example_input, targets, cfg.dependency_aware)
    ratios = {}
    for group in groups:
        if group[0] in kept:
            full = out_channels(targets[group[0]])
            ratios.update({name: 1 - (kept[group[0]] + 0.5) / full for name in group})
    return ratios


def _groups(model, example_input, targets, aware: bool) -> Tuple[List[List[str]], Dict[str, int]]:
    try:
        return channel_groups(model, example_input, targets, aware)
    except NotImplementedError as exc:
        raise PruneError(
            f"prune: {exc} is not supported by engine nni; set prune.dependency_aware: true "
            "or prune.engine: torch_pruning"
        ) from None


def _totals(model: nn.Module, example_input: torch.Tensor) -> Dict[str, int]:
    return {
        "params": count_params(model),
        "nonzero_params": count_nonzero_params(model),
        "macs": count_macs(model, (1, *example_input.shape[1:])),
    }


def _report(cfg, before, after, layers, seconds: float) -> Dict[str, Number]:
    report: Dict[str, Number] = {
        "method": cfg.method,
        "pruner": cfg.pruner,
        "engine": cfg.engine,
        "sparsity_target": cfg.sparsity,
        "sparsity_achieved": layer_stats.achieved_sparsity(cfg.method, layers),
        "layers_selected": len(layers),
        "layers_pruned": sum(1 for layer in layers if layer["pruned"]),
        "prune_seconds": round(seconds, 3),
    }
    if cfg.method == "channel":
        report["unaligned_layers"] = layer_stats.unaligned(layers, cfg.align)
    for key in ("params", "nonzero_params", "macs"):
        report[f"{key}_before"] = before[key]
        report[f"{key}_after"] = after[key]
    return report
