"""The algorithm core and the critics depend on torch and the standard library only."""

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dfpo"
ALLOWED = set(sys.stdlib_module_names) | {"torch", "__future__"}


@pytest.mark.parametrize("package", ["core", "critics"])
def test_core_and_critics_import_only_torch_and_stdlib(package):
    offenders = []
    for path in sorted((SRC / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                inside = name.startswith(("dfpo.core", "dfpo.critics"))
                if top not in ALLOWED and not inside:
                    offenders.append(f"{path.relative_to(SRC)}: {name}")
    assert not offenders, offenders


def test_dependencies_are_ranges_and_the_tested_versions_are_pinned_apart():
    """pyproject.toml declares ranges (dfpo installs beside TRL, verl or vLLM); constraints.txt pins each of them,
    and every extra's package, at the version CI tests."""
    import re
    import tomllib

    root = SRC.parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()

    def name_of(requirement: str) -> str:
        return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower()

    assert not [r for r in project["dependencies"] if "==" in r]
    extras = [r for group in project["optional-dependencies"].values() for r in group if not r.startswith("dfpo[")]
    unpinned = [r for r in [*project["dependencies"], *extras] if name_of(r) not in pins and name_of(r) != "vllm"]
    assert not unpinned, unpinned
