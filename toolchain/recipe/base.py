"""The base of every recipe section: unknown keys are errors, assignments are validated."""

from __future__ import annotations

from typing import ClassVar, Tuple

from pydantic import BaseModel, ConfigDict, model_serializer


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Fields added after recipes were cached, left out of a dump while unset: a recipe that does not
    # use one keeps the stage cache keys (and recipe hash) it had before the field existed.
    omitted_when_unset: ClassVar[Tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_unset_additions(self, handler):
        data = handler(self)
        if isinstance(data, dict):
            for name in self.omitted_when_unset:
                if data.get(name, ...) is None:
                    data.pop(name)
        return data
