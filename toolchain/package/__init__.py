"""Self-checking device packages: what a device needs to run the shipped model, and proof it works.

A package folder holds the shipped ONNX file(s), their ORT-format conversions with the
required-operators config for reduced onnxruntime builds, labels.txt, preprocess.json (the
preprocessing contract), golden PNG images with their preprocessed inputs and the models'
outputs, infer.py (numpy + onnxruntime + Pillow only), the toolchain's torch-free bench,
a README and manifest.json (sha256 and size of every other file).

    build.py   build_package(folder, models, metadata, images, labels, target_platform) -> manifest
    verify.py  verify_package(folder) -> checks; damaged_files(folder, manifest_sha256) -> [names]
    infer.py   the device script itself (copied verbatim into every package)
    readme.py  the device README

Library layer: never imports the engine or the stages (toolchain/stages/package.py does the glue).
"""
