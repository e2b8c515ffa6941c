"""Property-based fuzzing: the recipe loader returns a Recipe or raises RecipeError, nothing else."""

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolchain.errors import RecipeError
from toolchain.recipe import Recipe, load_recipe

KEYS = [
    "name",
    "seed",
    "device",
    "data",
    "teacher",
    "student",
    "distill",
    "prune",
    "finetune",
    "export",
    "bench",
    "tracking",
    "model",
    "epochs",
    "lr",
    "loss",
    "sparsity",
    "method",
    "pruner",
    "batch_size",
    "subset",
    "checkpoint",
    "alpha",
    "temperature",
    "providers",
    "batch_sizes",
    "opset",
    "align",
    "unknown",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(
        ["resnet18", "mobilenet_v2", "kd", "ce", "weight", "channel", "fashion_mnist", "l1", "level", "..", "a/b"]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
    max_leaves=12,
)
recipes = st.dictionaries(st.sampled_from(KEYS), values, max_size=8)
overrides = st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz._=-0123456789 []{}:,'\"", max_size=20), max_size=3)


def check(path, overrides_=()):
    try:
        assert isinstance(load_recipe(path, overrides_), Recipe)
    except RecipeError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe=recipes, extra=overrides)
def test_structured_recipes(tmp_path, recipe, extra):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    check(path, extra)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_arbitrary_text(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    check(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=100))
def test_arbitrary_bytes(tmp_path, data):
    path = tmp_path / "r.yaml"
    path.write_bytes(data)
    check(path)


DOTTED = [
    "seed",
    "device",
    "data.name",
    "data.subset",
    "data.val_fraction",
    "teacher.model",
    "teacher.train.epochs",
    "teacher.checkpoint",
    "student.model",
    "distill.loss",
    "distill.lr",
    "distill.alpha",
    "prune.method",
    "prune.pruner",
    "prune.sparsity",
    "prune.engine",
    "prune.scope",
    "prune.align",
    "finetune.epochs",
    "export.opset",
    "export.exporter",
    "bench.providers",
    "bench.batch_sizes",
    "tracking.uri",
    "name",
    "matrix",
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.sampled_from(DOTTED), values), min_size=1, max_size=4))
def test_valid_base_with_random_leaves(tmp_path, changes):
    """Start valid, then break a few leaves: deeper validators (pruner fit, kd/teacher) get exercised."""
    recipe = {"name": "r", "teacher": {"model": "resnet18"}, "student": {"model": "mobilenet_v2"}}
    for dotted, value in changes:
        node = recipe
        *parents, last = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    check(path)
