"""Thin CLI commands (python-fire). Importing this module must stay cheap: no torch here.

A ToolchainError (user mistake) prints one line on stderr and exits 2; Ctrl-C exits 130;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import List, Sequence


class Commands:
    """Deployment-oriented model compression: teacher -> KD student -> pruning -> KD fine-tune ->
    ONNX export with parity gate -> onnxruntime benchmark, tracked in MLflow.

    Start with: python -m toolchain compress recipes/mobilenet.yaml
    """

    def compress(self, recipe: str, *overrides: str, force: bool = False, fresh: bool = False):
        """Run every stage of RECIPE (YAML). Finished stages are reused; see README "Failure behaviour".

        Args:
          recipe: path to a YAML recipe, e.g. recipes/mobilenet.yaml
          overrides: dotted section.key=value pairs, e.g. distill.epochs=1 data.subset=2000
          force: recompute every stage instead of reusing finished outputs
          fresh: same as --force
        """
        from .engine.runner import compress

        _quiet()
        _stop_cleanly_on_sigterm()
        loaded = _load(recipe, overrides)
        if loaded.matrix is not None:
            from .errors import RecipeError

            raise RecipeError(
                f"{recipe} has a matrix section (a sweep of variants); run: python -m toolchain sweep {recipe}"
            )
        compress(loaded, force=force or fresh)

    def sweep(self, recipe: str, *overrides: str, force: bool = False, dry_run: bool = False, only: str = ""):
        """Run every variant of RECIPE's matrix section (or every recipe in a directory), one after another.

        All variants are validated before the first runs; they share finished stages (one teacher).
        A failed variant is reported and the sweep goes on; the exit code is 1 if any failed.

        Args:
          recipe: a YAML recipe with a `matrix:` section, or a directory of recipes (e.g. recipes/study/)
          overrides: dotted section.key=value pairs applied to every variant (not to matrix axes)
          force: recompute the stages instead of reusing finished outputs (each once per sweep: still one teacher)
          dry_run: only validate and list the variants
          only: run only the variants whose name matches this glob or substring
        """
        from .sweep import run_sweep

        _quiet()
        _stop_cleanly_on_sigterm()
        run_sweep(recipe, [str(o) for o in overrides], force=force, dry_run=dry_run, only=only or None)

    def report(self, experiment: str, out: str = "docs/report", tracking_uri: str = "", log: bool = True):
        """Table (markdown + CSV) and plots of the finished compress runs of an MLflow experiment.

        Args:
          experiment: MLflow experiment name (the recipes' tracking.experiment)
          out: output directory for report.md, report.csv and the PNG plots
          tracking_uri: MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db
          log: also log the report files to MLflow (a run named report in the experiment); --nolog to skip
        """
        from .report import make_report

        _quiet()
        make_report(str(experiment), out, tracking_uri or None, log_to_mlflow=log)

    def validate(self, recipe: str, *overrides: str):
        """Print the resolved recipe (defaults filled in) or the first error, one line, exit 2.

        Args:
          recipe: path to a YAML recipe
          overrides: dotted section.key=value pairs
        """
        from .engine.runner import plan
        from .recipe import shown, to_yaml

        loaded = _load(recipe, overrides)
        plan(loaded)  # the stages it enables fit together (bench needs export...)
        print(to_yaml(shown(loaded)), end="")  # the screen never shows the tracking password

    def latency_spec(self, recipe: str, *overrides: str, out: str = "latency_spec.json"):
        """Write the layer shapes a latency budget's cost model times (prune.budget with allocation
        latency_aware), for the device: python -m toolchain.bench --latency-table SPEC.json --json TABLE.json
        there, then prune.budget.device_table: TABLE.json here.

        Args:
          recipe: path to a YAML recipe with prune.budget.speedup or latency_ms
          overrides: dotted section.key=value pairs
          out: where the spec is written (JSON)
        """
        from .engine.runner import latency_spec
        from .fsutil import atomic_write_json

        _quiet()
        spec = latency_spec(_load(recipe, overrides))
        atomic_write_json(out, spec)
        print(
            f"wrote {out}: {len(spec['layers'])} layer shapes at batch {spec['batch_size']}, threads {spec['threads']}"
        )

    def bench(self, onnx: str, *args: str):
        """Benchmark an ONNX file with onnxruntime (torch-free). Same options as python -m toolchain.bench --help,
        e.g. bench export/RUN/model.onnx --batch-sizes 1,32 --providers cpu
        """
        from .bench.cli import main

        return main([onnx, *args])  # run() normally routes `bench` straight to main(), bypassing fire

    def attach(self, run: str, device_json: str, tracking_uri: str = "", experiment: str = ""):
        """Log a device's latency into the MLflow run that shipped the model: the JSON that
        python -m toolchain.bench export/RUN/model.onnx --json DEVICE.json wrote on the device.
        Refused (nothing logged) unless the JSON timed one of the run's shipped files (by sha256).

        Args:
          run: run name (newest finished compress run of that name) or parent run id
          device_json: the bench's --json file
          tracking_uri: MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db
          experiment: look for RUN only in this experiment (default: all)
        """
        from .attach import main

        # run() normally routes `attach` straight to main(): fire would turn a numeric-looking run id into a number
        return main(
            [
                str(run),
                str(device_json),
                *(["--tracking-uri", tracking_uri] if tracking_uri else []),
                *(["--experiment", experiment] if experiment else []),
            ]
        )

    def list(self, kind: str = "all"):
        """List registry names: models, sources, datasets, pruners, losses, quantizers, stages (or all)."""
        print("\n".join(_registry_lines(kind)))


def _registry_lines(kind: str) -> List[str]:
    from .errors import ToolchainError

    registries = _registries()
    if kind != "all" and kind not in registries:
        raise ToolchainError(f"unknown kind {kind!r}; choose one of: all, {', '.join(registries)}")
    chosen = registries if kind == "all" else {kind: registries[kind]}
    return [f"{name}: {', '.join(reg.names())}" for name, reg in chosen.items()]


def _registries():
    from . import stages  # noqa: F401  (registers the stages)
    from .data.datasets import DATASETS
    from .engine.stage import STAGES
    from .models.registry import MODELS
    from .models.sources import SOURCES
    from .onnx.quantize import CANDIDATES
    from .prune.registry import PRUNERS
    from .train.losses import LOSSES

    return {
        "models": MODELS,
        "sources": SOURCES,
        "datasets": DATASETS,
        "pruners": PRUNERS,
        "losses": LOSSES,
        "quantizers": CANDIDATES,
        "stages": STAGES,
    }


def _load(path: str, overrides: Sequence[str]):
    from .recipe import load_recipe

    return load_recipe(path, [str(o) for o in overrides])


def _quiet() -> None:
    """Library chatter (deprecations, tracer warnings) is not the user's business."""
    import warnings

    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    from .tracking import quiet_library_logs

    quiet_library_logs()


def _stop_cleanly_on_sigterm() -> None:
    """Schedulers (SLURM, Kubernetes, systemd) stop jobs with SIGTERM: treat it like Ctrl-C so
    the MLflow runs are marked KILLED and finished stages are kept."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def run(argv: List[str]) -> int:
    if argv[:1] == ["attach"] or (argv[:1] == ["bench"] and "--help" not in argv[1:2]):
        # argparse CLIs: bench is shared with python -m toolchain.bench; attach keeps run ids as typed (and its --help)
        if argv[0] == "bench":
            from .bench.cli import main
        else:
            from .attach import main

        try:
            return main(argv[1:])
        except SystemExit as exc:  # argparse exits on a bad option; return its code like the other commands
            return int(exc.code or 0)
    import fire

    from .errors import run_command

    def body() -> int:
        try:
            fire.Fire(Commands(), argv, name="toolchain")
        except fire.core.FireExit as exc:
            return int(exc.code or 0)
        return 0

    return run_command(body, interrupted="interrupted: finished stages are kept; rerun the same command to resume")
