"""First-order Taylor channel importance with NNI's TaylorPruner.

Taylor (Molchanov et al., CVPR 2019) scores a filter by sum over batches of
(weight x gradient)^2: how much the training loss would change if the filter were
removed. Unlike L1/L2/FPGM it needs data: NNI 3.0 collects the gradients inside its
own training loop (a TorchEvaluator that patches the optimizer's step and generates
the masks after `training_steps` steps). We hand it a loop over the recipe's training
batches and loss (the KD loss when the stage distils), with two choices:

- the optimizer's learning rate is 0: the weights are scored, not changed, so the
  masks describe the model the previous stage produced;
- the model stays in eval mode: BatchNorm normalises with its running statistics
  and does not overwrite them with the scoring batches (gradients flow either way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List

import torch
import torch.nn as nn

from . import nni_compat
from .registry import PruneError


@dataclass
class GradientSource:
    """Training batches and the loss whose gradients score channels."""

    batches: Iterable  # yields (inputs, labels); re-iterable (one pass per call)
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    steps: int  # batches to accumulate (the batches are cycled if there are fewer)


def taylor_masks(
    model: nn.Module, config: List[dict], source: GradientSource | None
) -> Dict[str, Dict[str, torch.Tensor]]:
    """NNI TaylorPruner masks for `config` (the same entries L1/L2/FPGM get)."""
    if source is None:
        raise PruneError(
            "prune.pruner 'taylor' scores channels with training gradients, but no training batches "
            "were given; run it through the pipeline or pass prune_model(..., gradients=GradientSource(...))"
        )
    nni_compat.import_nni_quietly()
    import nni
    from nni.compression.pruning import TaylorPruner
    from nni.compression.utils import TorchEvaluator

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.0)
    evaluator = TorchEvaluator(_scoring_loop(source), optimizer, lambda batch, m: source.loss(m, *batch))
    with nni_compat.quiet():
        pruner = TaylorPruner(model, config, evaluator, training_steps=source.steps)
        _, masks = pruner.compress()
        pruner.unwrap_model()
    return masks


def _scoring_loop(source: GradientSource):
    """The `training_func` NNI's evaluator calls: max_steps optimizer steps over the batches."""

    def training_func(model, optimizer, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        limit = max_steps or source.steps
        done = 0
        if hasattr(source.batches, "set_epoch"):  # same batches whatever ran before (cached stages or not)
            source.batches.set_epoch(0)
        while done < limit:  # the data may be shorter than the steps asked: go round again
            started = done
            for batch in source.batches:
                optimizer.zero_grad(set_to_none=True)
                training_step(batch, model).backward()
                optimizer.step()
                done += 1
                if done >= limit:
                    break
            if done == started:
                raise PruneError("prune.pruner 'taylor' got an empty set of training batches to score channels with")
        optimizer.zero_grad(set_to_none=True)

    return training_func
