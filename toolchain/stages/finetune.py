"""finetune: KD (or CE) training of the pruned model; weight-pruned zeros stay zero."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Dict, Sequence

from ..engine.artifacts import StageResult
from ..engine.stage import Job, Sections, register_stage
from .common import ModelStage, check_features, finalize, reseed, teacher_role, train

if TYPE_CHECKING:  # annotations only
    from ..data.loaders import DataBundle


@register_stage
class Finetune(ModelStage):
    name = "finetune"
    row_label = "pruned+KD ft"
    consumes = ("teacher", "distill", "prune")
    sections = ("finetune",)
    checked = ("student", "teacher")  # the feature paths the preflight resolves

    def preflight(self, cfg: Sections, data: DataBundle) -> None:
        check_features(cfg.finetune, cfg.student, cfg.teacher, data, "finetune")

    def inputs(self, cfg: Sections, models: Sequence[str], ran: Sequence[str]) -> Dict[str, str]:
        return {"model": models[-1], **teacher_role(cfg.finetune, models)}

    def compute(self, job: Job) -> StageResult:
        from ..prune import keep_sparsity

        reseed(job)
        source = job.inputs["model"]
        art = source.result.model()
        model = copy.deepcopy(source.model)
        keeper = keep_sparsity(model) if art.keep_zeros else None
        extra = {}  # adapters are rebuilt for the pruned shapes inside train
        history = train(job, model, job.cfg.finetune, "finetune", after_step=keeper, report=extra)
        return finalize(job, model, art.spec(), history, extra=extra, keep_zeros=art.keep_zeros)
