"""The device README of a package. Content only: the package is cached and shared by runs, so it
names no run (the published copy's manifest.json does, in `run`)."""

from __future__ import annotations

from typing import Any, Dict


def device_readme(
    contract: Dict[str, Any],
    models: Dict[str, Dict[str, str]],
    golden: Dict[str, Any],
    target_platform: str,
    batches: str,
) -> str:
    import onnxruntime

    default = models["int8" if "int8" in models else "float"]["ort"]
    shipped = models["int8" if "int8" in models else "float"]["onnx"]
    shape = "x".join(str(d) for d in contract["input_shape"][1:])
    rows = "\n".join(
        f"| `{files['onnx']}`, `{files['ort']}` | the {'INT8' if role == 'int8' else 'float'} model: "
        "ONNX, and ORT format for reduced onnxruntime builds |"
        for role, files in models.items()
    )
    steps = "\n".join(f"{i}. {step}" for i, step in enumerate(contract["steps"], 1))
    return f"""# Device package: image classifier, {len(contract["class_names"])} classes, input {shape}

Everything a device needs to run the model, and the data to prove it runs correctly there.
This package checked itself before it was published: each `.ort` file reproduced the golden
outputs in onnxruntime, and `infer.py` printed the expected classes for the golden images.

| file | what |
|---|---|
{rows}
| `required_operators.config` | the operators these models use: build onnxruntime with only them |
| `labels.txt` | class names, one per line, in output order |
| `preprocess.json` | the preprocessing contract (below) |
| `infer.py` | classify image files (numpy, onnxruntime, Pillow; no torch) |
| `golden/` | {len(golden["images"])} test images (`images/*.png`), their model inputs (`inputs.npy`), each model's logits (`outputs_<model>.npy`), expected classes (`expected.json`) |
| `toolchain/` | the toolchain's torch-free latency bench (`python -m toolchain.bench`) |
| `manifest.json` | sha256 and size of every other file |

## Install

    pip install onnxruntime numpy pillow

A reduced onnxruntime build (ORT format only) also runs the `.ort` files: build onnxruntime from
source with `--minimal_build --include_ops_by_config required_operators.config`. The files were
converted with onnxruntime {onnxruntime.__version__}; use that version or newer on the device.
Target platform `{target_platform}`: {_PLATFORM_NOTES[target_platform]}

## Run

    python infer.py photo.png other.jpg            # top-3 classes per file, model {default}
    python infer.py --model model.onnx --top-k 5 --json photo.png
    python infer.py --help

infer.py checks the model file and `preprocess.json` against `manifest.json` (sha256) before it
runs them: a corrupted or altered file is refused. For a model you replaced on purpose, pass
`--no-verify`; a model that does not take the contract's input is still refused, in one line.

Check the device gives the packaged answers (compare with `golden/expected.json`):

    python infer.py --model {models["float"]["ort"]} golden/images/*.png

## Preprocessing contract (`preprocess.json`)

{contract["preprocessing"]}. In order:

{steps}

Class names: `labels.txt` (also `class_names` in `preprocess.json`).

## Measure latency on the device

From this folder (the bundled `toolchain/` needs only numpy and onnxruntime):

    python -m toolchain.bench {shipped} --batch-sizes {batches} --json device.json

`{shipped}` here is byte for byte the run's `export/RUN/{shipped}`, so these numbers can be attached
to the run. The `.ort` files time the same way (`python -m toolchain.bench {default}`), but `attach`
accepts only timings of the run's shipped `.onnx` files.

## Attach the device numbers to the run

Copy `device.json` to the workstation and, in the toolchain checkout there:

    python -m toolchain attach RUN device.json

where `RUN` is the run name (`run.run_name` in `manifest.json`; the package is `export/RUN/package/`).
"""


_PLATFORM_NOTES = {
    "amd64": "x86-64 CPUs. The `.ort` files are optimised at onnxruntime's `extended` level, without the "
    "NCHWc layouts that level `all` blocks for the building machine's vector width, so they run on any "
    "x86-64 CPU; on an ARM device use a package built with `package.target_platform: arm`.",
    "arm": "ARM CPUs. The `.ort` files leave out the x86-only NCHWc layout and allow the signed-int8 QDQ "
    "fusions ARM's kernels prefer; the package was checked on the x86-64 machine that built it.",
}
