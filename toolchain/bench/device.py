"""What a latency number was measured on: the device fingerprint of `python -m toolchain.bench --json`.

Torch-free, like ort.py (standard library, numpy-free even): it runs on the deployment device.

    cpu_features(cpuinfo=None)      ISA flags that decide which int8 kernels are fast (quantize uses them too)
    needs_reduce_range(features)    onnxruntime's advice for u8s8 on x86 without VNNI
    cpu_model(), physical_cores()   from /proc/cpuinfo where there is one
    fingerprint(model_path, ...)    the JSON's `device` section: CPU, cores, ISA, OS, onnxruntime, threads,
                                    name, hostname (optional) and the model file's sha256
"""

from __future__ import annotations

import os
import platform
import re
import socket
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import BenchError
from ..fsutil import file_sha256

# a device name becomes part of MLflow metric keys (device.<name>.latency_p50_ms...): no dots
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux, or a sandbox without /proc
        return ""


def cpu_features(cpuinfo: Optional[str] = None) -> Dict[str, Any]:
    """What decides int8 speed and accuracy on this CPU. x86 without VNNI can overflow in
    onnxruntime's u8s8 kernels (onnxruntime asks for reduce_range there); AMX runs int8 matmuls
    in tiles; arm needs the dot-product extension (and i8mm) for fast int8."""
    flags, model = set(), ""
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features"):
            flags.update(value.split())
        elif key in ("model name", "cpu model") and not model:
            model = value.strip()
    return {
        "machine": platform.machine(),
        "cpu": model or platform.processor() or "",
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
        "vnni": bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}),
        "amx": bool(flags & {"amx_int8", "amx_tile"}),
        "arm_dotprod": "asimddp" in flags,
        "arm_i8mm": "i8mm" in flags,
    }


def needs_reduce_range(features: Dict[str, Any]) -> bool:
    """onnxruntime's advice: on x86 without VNNI, 7-bit weights avoid the u8s8 saturation."""
    return features["machine"] in ("x86_64", "AMD64", "i686") and not features["vnni"]


def cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def physical_cores() -> int:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; logical count elsewhere."""
    cores, phys = set(), "0"
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            cores.add((phys, value.strip()))
    return len(cores) or os.cpu_count() or 1


def default_name(hostname: str) -> str:
    """The hostname's first label, as a metric-key-safe name ("edge-01.lan" -> "edge-01")."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "-", hostname.split(".")[0]).strip("-_")
    return cleaned[:64] or "device"


def check_name(name: str, where: str = "--name") -> str:
    if not NAME_PATTERN.fullmatch(name or ""):
        raise BenchError(
            f"{where} {name!r} is not a device name; use 1-64 letters, digits, '-' or '_' "
            "(it becomes part of MLflow metric names), e.g. --name pi5"
        )
    return name


def _runtime() -> Dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError:  # the bench reports it before getting here; keep the fingerprint usable alone
        return {"onnxruntime": None, "providers_available": []}
    return {"onnxruntime": ort.__version__, "providers_available": ort.get_available_providers()}


def fingerprint(
    model_path: str | os.PathLike,
    name: Optional[str] = None,
    include_hostname: bool = True,
    intra_op_threads: int = 0,
    inter_op_threads: int = 1,
) -> Dict[str, Any]:
    """The `device` section of the bench JSON. `attach` finds the run by the model's sha256 and
    names the metrics after `name` (default: the hostname; "device" when the hostname is left out)."""
    hostname = socket.gethostname()
    features = cpu_features()
    section = {
        "name": check_name(name) if name else (default_name(hostname) if include_hostname else "device"),
        **({"hostname": hostname} if include_hostname else {}),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": {k: features[k] for k in ("avx2", "avx512", "vnni", "amx", "arm_dotprod", "arm_i8mm")},
        "needs_reduce_range": needs_reduce_range(features),
        "os": platform.system(),
        "os_release": platform.release(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        **_runtime(),
        "threads": {
            "intra_op": int(intra_op_threads),
            "intra_op_effective": int(intra_op_threads) or physical_cores(),
            "inter_op": int(inter_op_threads),
        },
        "model_file": Path(model_path).name,
        "model_sha256": file_sha256(model_path),
    }
    return section


def format_device(device: Dict[str, Any]) -> str:
    """One line for the bench's output: what the JSON's device section says."""
    isa = " ".join(k for k, v in device["isa"].items() if v) or "none of avx2/avx512/vnni/amx/dotprod/i8mm"
    return (
        f"device {device['name']}: {device['cpu_model']} ({device['logical_cores']} logical / {device['physical_cores']} "
        f"physical cores), {device['os']} {device['machine']}, int8 ISA: {isa}, model sha256 {device['model_sha256'][:12]}"
    )
