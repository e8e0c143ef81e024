"""The package's layers: every import, at module level or inside a function, goes down the stack, never up, and no
module imports itself back through others (``docs/architecture.md`` draws the layers). An import for annotations
only (under ``if TYPE_CHECKING:``) must go down the layers too, but may point back at the module that runs the
code it annotates (a phase of the training step names the ``Trainer`` it is given): it never runs."""

import ast
from pathlib import Path

import dfpo

ROOT = Path(dfpo.__file__).parent

# lowest first; a module may import its own layer's modules and any below
LAYERS = [
    ("core", "critics"),  # pure torch (tests/test_core_misc.py holds them to torch alone)
    ("options", "assets", "models", "cpu", "distributed", "tiny"),
    ("tasks", "generation"),  # prompts, answers, verifiers, user data | sampling and greedy decoding
    ("supervision", "evaluate"),  # noise models, pseudo-labels, the reward model | accuracy on a split
    ("training", "sft"),
    ("experiments",),
    ("api", "cli", "__main__", "__init__"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _typing_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            out |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return out


def _imports(typing_only: bool = True) -> dict[str, set[str]]:
    """Each module's imports of other dfpo modules (``typing_only=False``: without annotation-only ones)."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        tree = ast.parse(path.read_text())
        skip = set() if typing_only else _typing_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dfpo") and not node.level:
                targets = [node.module]
                if node.module == "dfpo" or f"{node.module}.{node.names[0].name}" in modules:
                    targets = [f"{node.module}.{a.name}" for a in node.names]
                found.update(t for t in targets if t in modules)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("dfpo.") and a.name in modules)
        graph[name] = found - {name}
    return graph


def test_every_import_goes_down_the_layers():
    graph = _imports()
    unplaced = sorted({_top(m) for m in graph} - set(RANK))
    assert not unplaced, f"place these in LAYERS: {unplaced}"
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets if RANK[_top(b)] > RANK[_top(a)]]
    assert not upward, upward


def test_no_import_cycle():
    graph, seen, stack, cycles = _imports(typing_only=False), set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append([*stack[stack.index(node) :], node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for target in sorted(graph[node]):
            if target != _package(node):  # a module may import its own package's __init__
                visit(target)
        stack.pop()

    for module in sorted(graph):
        visit(module)
    assert not cycles, cycles


def _package(module: str) -> str:
    return module.rsplit(".", 1)[0]


def test_the_training_step_reads_in_short_functions():
    """Every function of the training step's phases is at most 60 lines (docstring included), so that each phase
    reads on one screen."""
    long = []
    for name in ("phases", "update", "objectives", "step"):
        path = ROOT / "training" / f"{name}.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"training/{name}.py:{node.name} ({lines} lines)")
    assert not long, long


def test_the_readme_layout_names_every_module_and_package():
    """The README's layout section keeps up with the tree: every package and module of ``dfpo`` is named there."""
    readme = (ROOT.parent.parent / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    entries = [p.stem for p in ROOT.glob("*.py") if p.stem not in ("__init__", "__main__")]
    entries += [p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    entries += [f"{p.parent.name}/{p.stem}" for p in ROOT.glob("*/*.py") if p.stem != "__init__"]
    missing = [e for e in entries if e.split("/")[-1] not in layout]
    assert not missing, f"name these in README.md's Layout section: {missing}"
