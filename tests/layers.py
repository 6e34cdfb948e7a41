"""Check the layer contracts of the keras_opt_ref package by reading its source.

Standard library only: the package is parsed with ``ast``, never imported, so this runs
without TensorFlow, JAX, torch or Keras installed.

    python tests/layers.py [PACKAGE_DIR]

Every ``import`` and ``from ... import`` statement counts, including those nested in
functions; ``if TYPE_CHECKING:`` blocks and ``importlib.import_module("...")`` calls do not.
Prints one ``path:line: message`` line per violation and exits 1, or a summary and exits 0.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# ---------------------------------------------------------------- the contracts, as data
# Layers, lowest first. A module may import modules of its own layer or of lower layers.
# Each entry: (layer name, names relative to the package; "x.*" means every module below x).
# "backends.*" gives one backend layer per backend package (backends.tensorflow, ...); "" is the package.
LAYERS = [
    ("base", ["base", "base.*"]),
    ("backend", ["backends.*"]),
    ("registry", ["backends"]),
    ("train", ["train", "train.*"]),
    ("top", ["", "scipy_optimizer"]),
    ("app", ["cli", "bench", "bench.*"]),
]
LAYER_ORDER = "base < backends.<name> < backends (registry) < train < top < app (cli, bench)"
HARNESS = "app"  # the layer only the harness itself may import
NEUTRAL = {"base", "registry", "train", "top"}
# Third-party frameworks (top-level names). Neutral layers import none; a backend only its own.
FRAMEWORKS = {"tensorflow", "tf_keras", "jax", "jaxlib", "torch", "tensorflow_probability", "jaxopt",
              "optimistix", "equinox"}
BACKEND_FRAMEWORKS = {"tensorflow": {"tensorflow", "tf_keras"}, "jax": {"jax", "jaxlib"}, "torch": {"torch"}}


# ---------------------------------------------------------------- reading the package
def layer_of(module: str, package: str) -> tuple[int, str] | None:
    """(rank, label) of a module of the package, or None when it is in no layer."""
    rel = module[len(package) + 1:] if module != package else ""
    for rank, (name, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if pattern.endswith(".*"):
                head = pattern[:-1]
                if rel.startswith(head):
                    if name == "backend":
                        return rank, "backend " + rel[len(head):].split(".")[0]
                    return rank, name
            elif rel == pattern:
                return rank, name
    return None


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under package_dir."""
    package = package_dir.name
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(nodes):
    """Import statements in nodes and below them, skipping ``if TYPE_CHECKING:`` bodies."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _statements(node.orelse)
        else:
            yield from _statements(ast.iter_child_nodes(node))


def imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, imported module) for each module named by an import statement in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in _statements(tree.body):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
            continue
        base = node.module or ""
        if node.level:
            parts = here.split(".")
            parts = parts[:len(parts) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}" if base else alias.name
            found.append((node.lineno, sub if sub in modules else base))
    return found


# ---------------------------------------------------------------- the checks
def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of size > 1, and self imports (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _check_edge(module: str, layer: tuple[int, str], target: str, package: str) -> str | None:
    """The rule an import of target by module breaks, or None."""
    rank, label = layer
    if target != package and not target.startswith(package + "."):
        top = target.split(".")[0]
        if top not in FRAMEWORKS:
            return None
        if label.startswith("backend "):
            if top in BACKEND_FRAMEWORKS.get(label.split()[1], set()):
                return None
            return f"{label} imports only its own framework"
        if label in NEUTRAL:
            return "backend-neutral layers import no TensorFlow/JAX/torch"
        return None
    target_layer = layer_of(target, package)
    if target_layer is None:
        return f"{target} is outside the layers"
    if target_layer[1] == HARNESS and label != HARNESS:
        return "the library never imports the benchmark harness"
    if label.startswith("backend ") and target_layer[1].startswith("backend ") and target_layer[1] != label:
        return "backends are independent: no backend imports another"
    if target_layer[0] > rank:
        return f"a module imports only its own or lower layers ({LAYER_ORDER})"
    return None


def check(package_dir: Path) -> tuple[list[str], int, int]:
    """(violations, modules checked, internal import edges)."""
    package_dir = Path(package_dir).resolve()
    package, root = package_dir.name, package_dir.parent
    modules = module_names(package_dir)
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    problems = []
    for module, path in modules.items():
        where = path.relative_to(root).as_posix()
        layer = layer_of(module, package)
        if layer is None:
            problems.append(f"{where}:1: {module} is a module outside the layers: add it to a layer")
        try:
            found = imports(module, path, modules)
        except SyntaxError as err:
            problems.append(f"{where}:{err.lineno or 1}: {module} cannot be parsed: {err.msg}")
            continue
        for line, target in found:
            if target in modules:
                graph[module].setdefault(target, line)
            rule = _check_edge(module, layer, target, package) if layer else None
            if rule:
                problems.append(f"{where}:{line}: {module} ({layer[1]} layer) imports {target}: {rule}")
    for cycle in _cycles(graph):
        first = cycle[0]
        line = min(graph[first][m] for m in cycle if m in graph[first])
        what = f"{first} imports itself" if len(cycle) == 1 else f"import cycle among {', '.join(cycle)}"
        problems.append(f"{modules[first].relative_to(root).as_posix()}:{line}: {what}: no import cycles")
    return problems, len(modules), sum(len(targets) for targets in graph.values())


def violations(package_dir: Path) -> list[str]:
    """One ``path:line: message`` string per broken contract; empty when all hold."""
    return check(package_dir)[0]


def main(argv: list[str]) -> int:
    default = Path(__file__).resolve().parents[1] / "keras_opt_ref"
    package_dir = Path(argv[0]) if argv else default
    if not package_dir.is_dir():
        print(f"{package_dir}: not a package folder", file=sys.stderr)
        return 2
    problems, count, edges = check(package_dir)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print(f"layers ok: {count} modules checked, {edges} internal import edges")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
