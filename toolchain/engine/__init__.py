"""The engine: stage contract and registry, typed artifacts, the runner that keys, caches,
tracks and publishes. Stages (toolchain/stages/) plug in; libraries sit below both."""
