"""One file per stage; importing this package imports every module in it, which registers each
stage in engine.stage.STAGES (so a new stage is its own file, with no import list to edit).

To add a stage: CONTRIBUTING.md "Add a stage" (a @register_stage class: name, sections, consumes,
inputs, compute, restore, publish; its section in toolchain/recipe/schema.py when it reads a new one).
"""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
