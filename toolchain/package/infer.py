#!/usr/bin/env python3
"""Classify image files with the packaged model. Needs only numpy, onnxruntime and Pillow.

    python infer.py IMAGE [IMAGE ...] [--model model.ort] [--top-k 3] [--json] [--no-verify]

Every image is prepared exactly as the model was evaluated (preprocess.json, next to this
file): upright, grey or RGB as the contract says, fitted to the frame, resized and
centre-cropped to the input size, /255, normalised with the training mean/std, NCHW
float32. Prints the top-k classes of each file.

Before it loads them, the model file and the contract are checked against manifest.json
(their sha256): a corrupted or tampered file is refused instead of giving other answers. A
model you replaced on purpose (your own re-export, a model outside this folder) runs with
--no-verify; it must still take the input preprocess.json describes and give one score per class.

This file and imagefile.py (the toolchain's own image decoding, the code that built the
training cache) are copied verbatim into every device package by the package stage, which
also uses `preprocess_file` below to make the package's golden inputs, so the
preprocessing checked at packaging time is this very code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

try:  # inside the toolchain
    from ..data import imagefile
except ImportError:  # in a device package: the copy next to this file
    import imagefile  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
# the shipped model first: an INT8 file is in the package only when the run shipped one
DEFAULT_MODELS = ("model_int8.ort", "model.ort", "model_int8.onnx", "model.onnx")
MANIFEST = "manifest.json"


class InferError(Exception):
    """A user mistake: printed as one line, exit code 2."""


def load_contract(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InferError(
            f"cannot read the preprocessing contract {path} ({exc}); keep preprocess.json next to infer.py "
            "or pass --contract"
        ) from None


def preprocess_file(path: Path, contract: dict) -> np.ndarray:
    """One image file -> the model's (C, H, W) float32 input."""
    try:
        return imagefile.model_input(path, contract)
    except imagefile.ImageFileError as exc:
        raise InferError(f"{exc}; pass PNG/JPEG image files") from None


def preprocess(paths, contract: dict) -> np.ndarray:
    return np.stack([preprocess_file(Path(p), contract) for p in paths])


def default_model() -> Path:
    for name in DEFAULT_MODELS:
        if (HERE / name).is_file():
            return HERE / name
    raise InferError(f"no model next to {Path(__file__).name} ({', '.join(DEFAULT_MODELS)}); pass --model PATH")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, what: str, manifest_path: Path = None) -> None:
    """`path` is the file manifest.json lists under its name in this package (same sha256); a
    file outside the package must be a copy of a listed file of its kind (.ort, .onnx, .json). Else InferError."""
    manifest_path = manifest_path or HERE / MANIFEST
    skip = "pass --no-verify to run a file you replaced on purpose"
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InferError(
            f"cannot check {path.name}: {manifest_path} is missing or unreadable; restore the package's "
            f"manifest.json, or {skip}"
        ) from None
    if not path.is_file():
        return  # session() / load_contract() say it is missing
    got = sha256(path)
    try:
        inside = path.resolve().relative_to(manifest_path.resolve().parent).as_posix()
    except ValueError:
        inside = None
    if inside is not None:
        expected = (files.get(inside) or {}).get("sha256")
        if expected != got:
            state = "is not listed in" if expected is None else "has another sha256 than"
            raise InferError(
                f"{what} {path} {state} {MANIFEST} (corrupted or replaced); restore it from the package, or {skip}"
            )
    elif got not in {e.get("sha256") for n, e in files.items() if Path(n).suffix == path.suffix}:
        raise InferError(f"{what} {path} is not a copy of a {path.suffix} file listed in {manifest_path}; {skip}")


def check_fits(sess, model: Path, contract: dict) -> None:
    """The model takes the contract's (C, H, W) input and gives one score per class name: a model
    from another run or export is one line here, not an onnxruntime traceback on the first image."""
    shape, wanted = list(sess.get_inputs()[0].shape), list(contract.get("input_shape") or [])[1:]
    if len(shape) != 4 or any(isinstance(d, int) and d != w for d, w in zip(shape[1:], wanted)):
        raise InferError(
            f"model {model} takes input {shape}, but preprocess.json prepares images as "
            f"[batch, {', '.join(map(str, wanted))}]; use the model and preprocess.json of one package "
            "(--model, --contract)"
        )
    out = list(sess.get_outputs()[0].shape)
    classes = len(contract.get("class_names") or [])
    if out and isinstance(out[-1], int) and out[-1] != classes:
        raise InferError(
            f"model {model} gives {out[-1]} scores per image, but preprocess.json names {classes} classes; "
            "use the model and preprocess.json of one package (--model, --contract)"
        )


def session(model: Path, threads: int = 0):
    import onnxruntime as ort

    if not model.is_file():
        raise InferError(f"model file {model} not found; pass --model with a .ort or .onnx file of this package")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if model.suffix == ".ort":  # said explicitly: a reduced (ORT-format only) build needs no guess
        opts.add_session_config_entry("session.load_model_format", "ORT")
    try:
        return ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind types
        raise InferError(f"onnxruntime cannot load {model}: {str(exc).splitlines()[0]}") from None


def fixed_batch(sess):
    """The batch size a model was exported with (export.dynamic_batch: false), None when dynamic."""
    dim = sess.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else None


def run_model(sess, batch: np.ndarray) -> np.ndarray:
    """Logits for any number of images. A fixed-batch model runs B images at a time, the last
    group topped up with copies of its last image whose outputs are dropped (eval-mode layers
    treat every image on its own, so the copies change nothing)."""
    name, size = sess.get_inputs()[0].name, fixed_batch(sess)
    if size is None:
        return sess.run(None, {name: batch})[0]
    out = []
    for start in range(0, len(batch), size):
        group = batch[start : start + size]
        full = np.concatenate([group, np.repeat(group[-1:], size - len(group), axis=0)])
        out.append(sess.run(None, {name: full})[0][: len(group)])
    return np.concatenate(out)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def classify(sess, batch: np.ndarray, names, k: int):
    """Per image: the k best classes, best first, as {index, name, probability}."""
    probs = softmax(run_model(sess, batch).astype(np.float64))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        [{"index": int(c), "name": names[int(c)], "probability": float(p[c])} for c in row]
        for row, p in zip(order, probs)
    ]


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="infer.py",
        description="Classify image files with the packaged model (numpy, onnxruntime and Pillow only).",
    )
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help=f"a .ort or .onnx file (default: the first of {', '.join(DEFAULT_MODELS)})",
    )
    p.add_argument(
        "--contract",
        type=Path,
        default=HERE / "preprocess.json",
        help="preprocessing contract (default: preprocess.json here)",
    )
    p.add_argument("--top-k", type=int, default=3, help="classes printed per image (default 3)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (default 0: one per core)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help=f"do not check the model and contract against {MANIFEST}'s sha256 (for a model you replaced on purpose)",
    )
    return p.parse_args(argv)


def run(args) -> list:
    if args.top_k < 1:
        raise InferError(f"--top-k must be >= 1, got {args.top_k}")
    model = args.model or default_model()
    if not args.no_verify:
        verify(args.contract, "preprocessing contract")
        verify(model, "model file")
    contract = load_contract(args.contract)
    sess = session(model, args.threads)
    check_fits(sess, model, contract)
    names = contract["class_names"]
    top = classify(sess, preprocess(args.images, contract), names, min(args.top_k, len(names)))
    return [{"file": str(f), "top": t} for f, t in zip(args.images, top)]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
    except InferError as exc:
        print(f"infer.py: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
    for r in [] if args.json else results:
        print(f"{r['file']}: " + ", ".join(f"{t['name']} {t['probability']:.3f}" for t in r["top"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
