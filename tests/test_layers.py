"""The layer contracts of keras_opt_ref (see tests/layers.py), and that the checker catches each kind of break.

Standard library and pytest only: runs as
``python -m pytest tests/test_layers.py --noconftest -p no:cacheprovider`` without TensorFlow or Keras.
"""

import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import layers  # noqa: E402

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "keras_opt_ref"

# A small package that keeps every contract; each test below breaks one.
CLEAN = {
    "__init__.py": "from .train.run import train\nfrom . import scipy_optimizer\n",
    "scipy_optimizer.py": "import keras\n\nfrom .train import run\n",
    "cli.py": "from .bench import measure\nfrom . import train\n",
    "base/__init__.py": "",
    "base/flat.py": "import numpy as np\nimport keras\n",
    "base/objective.py": "from . import flat\nfrom .flat import np\n",
    "backends/__init__.py": (
        "import importlib\n\nfrom ..base import objective\n\n\n"
        "def load(name):\n    return importlib.import_module('keras_opt_ref.backends.jax')\n"
    ),
    "backends/jax/__init__.py": "",
    "backends/jax/objective.py": "import jax\nimport jax.numpy as jnp\n\nfrom ...base import flat\n",
    "backends/tensorflow/__init__.py": "",
    "backends/tensorflow/objective.py": (
        "import tensorflow as tf\nimport tf_keras\n\nfrom ...base.objective import flat\n"
    ),
    "train/__init__.py": "",
    "train/run.py": (
        "from typing import TYPE_CHECKING\n\nfrom .. import backends\nfrom ..base import flat\n\n"
        "if TYPE_CHECKING:\n    import tensorflow as tf\n\n\n"
        "def train():\n    from . import methods\n    return methods\n"
    ),
    "train/methods.py": "import scipy.optimize\n",
    "bench/__init__.py": "",
    "bench/measure.py": (
        "import tensorflow\nimport torch\n\nfrom ..train import methods\nfrom ..backends.jax import objective\n"
    ),
}


def make_package(tmp_path: Path, changes: dict[str, str] | None = None) -> Path:
    """Write CLEAN, with changes (file path -> source) applied, as tmp_path/keras_opt_ref."""
    files = {**CLEAN, **(changes or {})}
    root = tmp_path / "keras_opt_ref"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


def only(problems: list[str]) -> str:
    assert len(problems) == 1, "\n".join(problems)
    return problems[0]


def test_the_package_keeps_its_layers():
    problems = layers.violations(PACKAGE_DIR)
    assert not problems, "layer contracts broken:\n" + "\n".join(problems)


def test_a_clean_package_has_no_violations(tmp_path):
    assert layers.violations(make_package(tmp_path)) == []
    assert layers.main([str(tmp_path / "keras_opt_ref")]) == 0


def test_base_importing_tensorflow_in_a_function(tmp_path):
    root = make_package(tmp_path, {"base/flat.py": "import keras\n\n\ndef f():\n    import tensorflow\n"})
    assert only(layers.violations(root)) == (
        "keras_opt_ref/base/flat.py:5: keras_opt_ref.base.flat (base layer) imports tensorflow: "
        "backend-neutral layers import no TensorFlow/JAX/torch")
    assert layers.main([str(root)]) == 1


def test_base_importing_train_is_an_upward_import(tmp_path):
    root = make_package(tmp_path, {"base/flat.py": "from ..train.methods import scipy\n"})
    problem = only(layers.violations(root))
    assert problem.startswith("keras_opt_ref/base/flat.py:1: keras_opt_ref.base.flat (base layer) "
                              "imports keras_opt_ref.train.methods: a module imports only its own or lower layers")


def test_a_cycle_through_function_level_imports(tmp_path):
    root = make_package(tmp_path, {"train/methods.py": "def f():\n    from .run import train\n    return train\n"})
    assert only(layers.violations(root)) == (
        "keras_opt_ref/train/methods.py:2: import cycle among keras_opt_ref.train.methods, "
        "keras_opt_ref.train.run: no import cycles")


def test_a_self_import_is_a_cycle(tmp_path):
    root = make_package(tmp_path, {"train/methods.py": "def f():\n    from .methods import f\n    return f\n"})
    assert "keras_opt_ref.train.methods imports itself" in only(layers.violations(root))


def test_backends_are_independent(tmp_path):
    root = make_package(tmp_path, {"backends/jax/objective.py": "import jax\n\nfrom ..tensorflow import objective\n"})
    assert only(layers.violations(root)) == (
        "keras_opt_ref/backends/jax/objective.py:3: keras_opt_ref.backends.jax.objective (backend jax layer) "
        "imports keras_opt_ref.backends.tensorflow.objective: backends are independent: no backend imports another")


def test_a_backend_imports_only_its_own_framework(tmp_path):
    root = make_package(tmp_path, {"backends/jax/objective.py": "import jax\nimport tensorflow_probability\n"})
    assert "imports tensorflow_probability: backend jax imports only its own framework" in only(
        layers.violations(root))


def test_the_library_never_imports_the_benchmark_harness(tmp_path):
    root = make_package(tmp_path, {"train/extra.py": "import scipy\nfrom keras_opt_ref.bench import measure\n"})
    assert only(layers.violations(root)) == (
        "keras_opt_ref/train/extra.py:2: keras_opt_ref.train.extra (train layer) imports "
        "keras_opt_ref.bench.measure: the library never imports the benchmark harness")


def test_a_module_outside_the_layers(tmp_path):
    root = make_package(tmp_path, {"core.py": "import keras\n"})
    assert only(layers.violations(root)) == (
        "keras_opt_ref/core.py:1: keras_opt_ref.core is a module outside the layers: add it to a layer")



def test_the_top_layer_never_imports_the_cli(tmp_path):
    root = make_package(tmp_path, {"scipy_optimizer.py": "from . import cli\n"})
    assert "keras_opt_ref.scipy_optimizer (top layer) imports keras_opt_ref.cli: the library never imports " \
        "the benchmark harness" in only(layers.violations(root))
