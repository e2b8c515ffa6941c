"""One file per stage; importing this package registers them all in engine.stage.STAGES.

To add a stage: a new file here with a @register_stage class (name, order, sections,
inputs, compute, restore, publish) and its section in toolchain/recipe.py.
"""

from . import bench, distill, export, finetune, package, prune, quantize, teacher  # noqa: F401
