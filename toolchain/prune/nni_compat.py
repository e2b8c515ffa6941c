"""Make NNI 3.0's ModelSpeedup run on torch 2.14, and keep NNI quiet.

NNI 3.0 (2023, dormant) breaks in two places of
`nni/common/concrete_trace_utils/concrete_tracer.py` on torch 2.14:

1. While wrapping leaf functions the tracer reads `func.__module__.startswith(...)`.
   Some torch built-ins (`TensorBase._make_subclass`, `_make_wrapper_subclass`,
   `_dtensor__new__`) have `__module__ is None` -> AttributeError. They create tensor
   subclasses and never appear in a CNN's forward, so we hide them from the tracer's
   leaf table while tracing.
2. `node_is_impure_wrapper(node)` is patched over `torch.fx.Node.is_impure`, which
   torch 2.14 calls as `is_impure(impure_random)` -> TypeError. We swap in a wrapper
   that accepts (and ignores) the extra arguments; the tracer looks the name up in its
   module globals at call time, so replacing the module attribute is enough.

Two more breakages come from Python 3.11 bytecode, in `concrete_proxy.py`: to tell
`if proxy:` from other uses, `ConcreteProxy.__bool__/__iter__/__len__/keys` look up
the calling instruction as `dis.get_instructions(code)[f_lasti // 2]`.

3. Python 3.11 interleaves inline CACHE code units, which `get_instructions` skips, so
   the index points past the instruction (IndexError in EfficientNet's
   StochasticDepth, or silently the wrong opcode). We hand the module a `dis` whose
   `get_instructions` returns one entry per code unit (a cache slot holds the next
   real instruction, so `insts[cur + 1]` is still "the next instruction").
4. Python 3.11 renamed the conditional jumps (POP_JUMP_FORWARD_IF_FALSE, ...), so
   `ConcreteProxy.jump_opcodes` misses them and `if proxy:` returns a proxy from
   `__bool__` (TypeError). We add the 3.11 names.

5. Not a breakage but a cost: NNI's replace_conv2d loops over a conv's groups in Python, seconds
   per depthwise-heavy model; conv_replace.replace_conv2d builds the same module without the loop.

`patched()` applies all of them for the duration of a `with` block and restores NNI exactly
as it was afterwards. It nests (a depth counter) so that callers need not care
whether an outer block already patched. Only toolchain.prune uses it, and only around
ModelSpeedup: importing the toolchain never changes NNI globally.
"""

from __future__ import annotations

import contextlib
import dis as _dis
import functools
import io
import logging
import sys
import threading
import warnings
from types import MethodDescriptorType, MethodWrapperType
from typing import Iterator

_lock = threading.RLock()
_depth = 0
_saved: dict = {}

# Loggers NNI writes to at import and during tracing / speedup / pruning.
NNI_LOGGERS = ("nni", "Shape_Dependency", "Shape Dependency", "FixMaskConflict", "concrete_tracer", "torch.fx")


_JUMPS_311 = (
    "POP_JUMP_FORWARD_IF_FALSE",
    "POP_JUMP_FORWARD_IF_TRUE",
    "POP_JUMP_BACKWARD_IF_FALSE",
    "POP_JUMP_BACKWARD_IF_TRUE",
)


class _CodeUnitDis:
    """`dis` as NNI's proxy expects it: instruction list indexable by f_lasti // 2."""

    def __getattr__(self, name):
        return getattr(_dis, name)

    @staticmethod
    def get_instructions(code, *args, **kwargs):
        return _instruction_table(code)


# NNI's proxy disassembles the calling frame's code each time a proxy is unpacked, iterated or
# tested for truth: thousands of times per trace for the same few forward functions.
@functools.lru_cache(maxsize=1024)
def _instruction_table(code) -> tuple:
    table = []
    for inst in _dis.get_instructions(code):
        while len(table) < inst.offset // 2:  # cache slots of the previous instruction
            table.append(inst)
        table.append(inst)
    return tuple(table)


def _proxy_module():
    from nni.common.concrete_trace_utils import concrete_proxy

    return concrete_proxy


def _tracer_module():
    from nni.common.concrete_trace_utils import concrete_tracer

    return concrete_tracer


def _crashes_tracer(func) -> bool:
    """True for leaf functions whose wrapping reaches `func.__module__.startswith`."""
    if getattr(func, "__module__", "") is not None:
        return False
    qualname = getattr(func, "__qualname__", "")
    if qualname.startswith(("_TensorBase", "_VariableFunctionsClass")):
        return False
    return not isinstance(func, (MethodDescriptorType, MethodWrapperType))


def _make_is_impure(nni_wrapper):
    def node_is_impure_compat(node, *args, **kwargs):
        # torch >= 2.5 passes impure_random; NNI's purity rules do not depend on it.
        return nni_wrapper(node)

    node_is_impure_compat.__wrapped__ = nni_wrapper
    return node_is_impure_compat


def _apply() -> None:
    ct = _tracer_module()
    table = ct.ConcreteTracer.default_autowrap_leaf_function
    _saved["leaf"] = {f: entry for f, entry in table.items() if _crashes_tracer(f)}
    for func in _saved["leaf"]:
        del table[func]
    _saved["impure"] = ct.node_is_impure_wrapper
    ct.node_is_impure_wrapper = _make_is_impure(ct.node_is_impure_wrapper)
    if sys.version_info >= (3, 11):
        _apply_bytecode_fixes()
    from nni.compression.speedup import replacement

    from .conv_replace import replace_conv2d

    _saved["conv2d"] = replacement.replace_module["Conv2d"]
    replacement.replace_module["Conv2d"] = replace_conv2d


def _apply_bytecode_fixes() -> None:
    cp = _proxy_module()
    proxy = cp.ConcreteProxy
    _saved["dis"], _saved["jumps"] = cp.dis, proxy.jump_opcodes
    cp.dis = _CodeUnitDis()
    extra = tuple(_dis.opmap[n] for n in _JUMPS_311 if n in _dis.opmap and _dis.opmap[n] not in proxy.jump_opcodes)
    proxy.jump_opcodes = tuple(proxy.jump_opcodes) + extra


def _restore() -> None:
    ct = _tracer_module()
    ct.ConcreteTracer.default_autowrap_leaf_function.update(_saved.pop("leaf"))
    ct.node_is_impure_wrapper = _saved.pop("impure")
    from nni.compression.speedup import replacement

    replacement.replace_module["Conv2d"] = _saved.pop("conv2d")
    if "dis" in _saved:
        cp = _proxy_module()
        cp.dis = _saved.pop("dis")
        cp.ConcreteProxy.jump_opcodes = _saved.pop("jumps")


def is_patched() -> bool:
    return _depth > 0


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """Apply the torch-2.14 fixes to NNI's tracer inside the block (idempotent, nests)."""
    global _depth
    with _lock:
        if _depth == 0:
            _apply()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _restore()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence NNI's loggers, stray prints and deprecation warnings inside the block.

    Speedup prints mask-conflict details to stdout and logs every replaced module at
    INFO; torch.jit.trace (NNI's dependency analysis) warns that it is deprecated.
    Errors still reach the log; exceptions propagate.
    """
    loggers = [logging.getLogger(name) for name in NNI_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def import_nni_quietly() -> None:
    """Import the NNI modules we use with their import-time chatter muted.

    `import nni` attaches a handler that prints INFO records to stdout; we detach it
    (nni.runtime.log.silence_stdout) so NNI's records go only where the application's
    own logging config sends them, at WARNING and above.
    """
    with quiet():
        import nni.compression.pruning  # noqa: F401
        import nni.compression.speedup  # noqa: F401
        from nni.runtime.log import silence_stdout

        silence_stdout()
    logging.getLogger("nni").setLevel(logging.WARNING)
