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
