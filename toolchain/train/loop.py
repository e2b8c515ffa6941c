"""One training loop for every stage; a task object decides what the loss sees.

ClassificationTask trains on labels; DistillationTask adds a frozen teacher's logits
(timm's distillation task is the model). Teacher training, KD distillation, iterative
pruning steps and fine-tuning all go through `fit`.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import CheckpointError, TrainingError, first_line
from ..models.checkpoint import load_state, save_state
from . import ddp as dist
from . import precision as prec
from .tasks import ClassificationTask, DistillationTask


def make_optimizer(model: nn.Module, cfg, extra: Optional[nn.Module] = None) -> torch.optim.Optimizer:
    """extra: modules trained with the model but not part of it (feature-distillation adapters)."""
    modules = [model] + ([extra] if extra is not None else [])
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
    )


def make_scheduler(optimizer, cfg, total_steps: int):
    """Stepped per batch, so few-epoch runs still get a full schedule."""
    total_steps = max(1, total_steps)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode for the with-block (BN uses running stats, dropout off), then its old mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def memory_layout(model: nn.Module, task: ClassificationTask, channels_last: bool):
    """Student (and teacher) in channels-last layout for the with-block, default layout after.

    oneDNN's depthwise and 1x1 convs run about twice as fast channels-last on CPU; the
    models go back to the default layout so pruning, export and checkpoints see plain tensors.
    Enter it before DDP wraps the model (DDP must see the final parameter storage).
    """
    modules = [model] + ([task.teacher] if isinstance(task, DistillationTask) else [])
    if channels_last:
        for module in modules:
            module.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        if channels_last:
            for module in modules:
                module.to(memory_format=torch.contiguous_format)


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@torch.no_grad()
def evaluate(model: nn.Module, batches, channels_last: bool = False) -> Dict[str, float]:
    correct, loss_sum, n = 0, 0.0, 0
    with eval_mode(model):
        for x, y in batches:
            logits = model(_layout(x, channels_last))
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1)}


@dataclass
class FitResult:
    history: List[Dict[str, float]] = field(default_factory=list)
    best_val_accuracy: float = 0.0
    best_epoch: int = -1
    seconds: float = 0.0
    resumed_from_epoch: Optional[int] = None
    precision: Optional[prec.Precision] = None  # decided once per stage; a resumed run keeps it


def fit(
    model: nn.Module,
    task: ClassificationTask,
    train_batches,
    val_batches,
    cfg,
    *,
    stage: str,
    state_path: Optional[Path] = None,
    on_epoch: Optional[Callable[[int, Dict[str, float]], None]] = None,
    after_step: Optional[Callable[[], None]] = None,
) -> FitResult:
    """Train `model` in place for cfg.epochs; keep the weights of the best validation epoch.

    state_path: a per-epoch resume checkpoint (model, optimizer, scheduler, epoch, RNG);
    if it exists, training continues after its epoch. after_step runs after every
    optimizer step (weight pruning re-applies its masks there).
    """
    _check_batches(model, train_batches, stage)
    result = FitResult()
    optimizer, scheduler, start_epoch, best_state = _start(
        model, task, cfg, len(train_batches), state_path, stage, result
    )
    dist.share_module(task.features)  # torchrun: every rank goes on from rank 0's adapters (fresh or resumed)
    channels_last = getattr(cfg, "channels_last", False)
    if result.precision is None and start_epoch < cfg.epochs:
        result.precision = _choose_precision(model, task, train_batches, cfg, stage, channels_last)
    task.precision = result.precision or prec.Precision()
    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        train_metrics = _train_epoch(
            model, task, train_batches, optimizer, scheduler, epoch, cfg.epochs, stage, after_step, channels_last
        )
        dist.sync_buffers(model)  # torchrun: rank 0's BatchNorm stats everywhere, so every rank's val agrees
        val = evaluate(dist.unwrap(model), val_batches, channels_last)
        metrics = {
            **train_metrics,
            "val_accuracy": val["accuracy"],
            "val_loss": val["loss"],
            "lr": scheduler.get_last_lr()[0],
        }
        result.history.append(metrics)
        if val["accuracy"] >= result.best_val_accuracy:
            result.best_val_accuracy, result.best_epoch = val["accuracy"], epoch
            best_state = copy.deepcopy(dist.unwrap(model).state_dict())
        # the resume checkpoint first: if logging fails (the tracking server died), the epoch is not lost
        if state_path is not None and dist.is_main():
            _save(state_path, model, task, optimizer, scheduler, epoch, result, best_state)
        if on_epoch:
            on_epoch(epoch, metrics)
        _log_epoch(stage, epoch, cfg.epochs, metrics)
    if best_state is not None:
        dist.unwrap(model).load_state_dict(best_state)
    result.seconds = time.perf_counter() - t0
    return result


def _train_epoch(
    model, task, batches, optimizer, scheduler, epoch, epochs, stage, after_step, channels_last=False
) -> Dict[str, float]:
    model.train()
    if task.features is not None:
        task.features.train()
    task.epoch = epoch
    if hasattr(batches, "set_epoch"):
        batches.set_epoch(epoch)
    loss_sum, correct, n = 0.0, 0, 0
    term_sums: Dict[str, float] = {}
    bar = tqdm(batches, desc=f"{stage} {epoch + 1}/{epochs}", leave=False, disable=None if dist.is_main() else True)
    t0 = time.perf_counter()
    for x, y in bar:
        loss, logits, terms = task.loss(model, _layout(x, channels_last), y)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"{stage}: loss became {loss_value} in epoch {epoch + 1}; lower the learning rate "
                f"({stage}.lr) or check the data normalisation"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(task.features)  # DDP all-reduces the model's gradients, not the adapters'
        optimizer.step()
        scheduler.step()
        if after_step:
            after_step()
        loss_sum += loss_value * len(y)
        for name, value in terms.items():
            term_sums[name] = term_sums.get(name, 0.0) + value.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
        bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{correct / n:.3f}")
    seconds = time.perf_counter() - t0
    return {
        "train_loss": loss_sum / max(n, 1),
        "train_accuracy": correct / max(n, 1),
        "epoch_seconds": seconds,
        "images_per_second": n / max(seconds, 1e-9),
        **{f"loss.{name}": total / max(n, 1) for name, total in term_sums.items()},
    }


def _choose_precision(model, task, batches, cfg, stage: str, channels_last: bool) -> prec.Precision:
    """Rank 0 decides (timing a copy of the model on the first batch), every rank trains with it.
    The first batch's draw is undone by the epoch's set_epoch, so the data order is unchanged."""
    setting = getattr(cfg, "precision", "fp32")
    if setting == "fp32" or task.features is not None:  # adapters are trained on fp32 feature maps
        return prec.Precision()

    def decide() -> prec.Precision:
        x, y = next(iter(batches))
        x = _layout(x, channels_last)
        teacher = task.teacher if isinstance(task, DistillationTask) else None
        return prec.choose(setting, dist.unwrap(model), teacher, x, y, on_cpu=x.device.type == "cpu")

    chosen = dist.share(decide() if dist.is_main() else None)
    if dist.is_main():
        tqdm.write(f"  {stage}: precision {setting} -> {chosen.text()}")
    return chosen


def _log_epoch(stage: str, epoch: int, epochs: int, m: Dict[str, float]) -> None:
    if dist.is_main():
        tqdm.write(
            f"  {stage} epoch {epoch + 1}/{epochs}: loss {m['train_loss']:.3f}  "
            f"val acc {m['val_accuracy']:.4f}  ({m['epoch_seconds']:.0f}s, {m['images_per_second']:.0f} img/s)"
        )


def _save(path, model, task, optimizer, scheduler, epoch, result: FitResult, best_state) -> None:
    save_state(
        {
            "model": dist.unwrap(model).state_dict(),
            "adapters": task.features.state_dict() if task.features is not None else {},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": torch.tensor(epoch),
            "torch_rng": torch.get_rng_state(),
            # float64, as the values are: in float32 a best accuracy of 0.1 came back as 0.10000000149,
            # so after a resume an epoch that tied it no longer counted as best (`>=`) and the resumed
            # run kept another epoch's weights than the uninterrupted one
            "history": [{k: torch.tensor(v, dtype=torch.float64) for k, v in h.items()} for h in result.history],
            "best": best_state or {},
            "best_epoch": torch.tensor(result.best_epoch),
            "best_val_accuracy": torch.tensor(result.best_val_accuracy, dtype=torch.float64),
            "precision": {"student": result.precision.student, "teacher": result.precision.teacher}
            if result.precision
            else {},
        },
        path,
    )


def _check_batches(model: nn.Module, train_batches, stage: str) -> None:
    batch_size = getattr(train_batches, "batch_size", None)  # a Batches loader (tests may pass a list)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and batch_size == 1:
        raise TrainingError(
            f"{stage}: data.batch_size is 1 but the model has BatchNorm layers, "
            "which cannot train on one image per batch; set data.batch_size: 2 or more"
        )
    if len(train_batches) == 0:
        raise TrainingError(
            f"{stage}: no training batch ({getattr(train_batches, 'num_samples', 0)} training images on "
            "this process); use more data (data.subset) or a smaller data.batch_size"
        )


def _start(model, task, cfg, steps_per_epoch: int, state_path, stage: str, result: FitResult):
    """Optimizer and schedule, resumed from state_path when it holds a readable epoch checkpoint.
    A damaged one (a kill mid-write on a filesystem without atomic rename, a disk error) restarts
    the stage's training with a warning instead of failing every rerun."""

    def fresh():
        optimizer = make_optimizer(model, cfg, task.features)
        return optimizer, make_scheduler(optimizer, cfg, cfg.epochs * steps_per_epoch)

    optimizer, scheduler = fresh()
    if state_path is None or not Path(state_path).is_file():
        return optimizer, scheduler, 0, None
    initial = copy.deepcopy(dist.unwrap(model).state_dict())
    initial_adapters = copy.deepcopy(task.features.state_dict()) if task.features is not None else None
    try:
        start_epoch, best_state = _restore(state_path, model, task, optimizer, scheduler, result)
    except (CheckpointError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        tqdm.write(
            f"  {stage}: warning: resume file {state_path} is damaged ({first_line(exc, 120)}); "
            "training this stage from the start"
        )
        Path(state_path).unlink(missing_ok=True)
        dist.unwrap(model).load_state_dict(initial)
        if initial_adapters is not None:
            task.features.load_state_dict(initial_adapters)
        result.__init__()
        return (*fresh(), 0, None)
    if dist.is_main():
        tqdm.write(f"  {stage}: resuming after epoch {start_epoch} of {cfg.epochs} from {state_path}")
    return optimizer, scheduler, start_epoch, best_state


def _restore(path, model, task, optimizer, scheduler, result: FitResult):
    state = load_state(path)
    dist.unwrap(model).load_state_dict(state["model"])
    if task.features is not None:  # a state without adapters (features added since) raises: start over
        task.features.load_state_dict(state["adapters"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    result.history = [{k: float(v) for k, v in h.items()} for h in state["history"]]
    result.best_epoch = int(state["best_epoch"])
    result.best_val_accuracy = float(state["best_val_accuracy"])
    result.resumed_from_epoch = int(state["epoch"])
    if state.get("precision"):  # resume in the precision the first epochs trained in
        result.precision = prec.Precision(state["precision"]["student"], state["precision"]["teacher"])
    return int(state["epoch"]) + 1, (state["best"] or None)
