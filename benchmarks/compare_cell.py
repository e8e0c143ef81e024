"""Compare a noisy-grid cell's JSON with a committed one: identical in all but timing, the keys added since, and
``checkpoint.final=false`` in the settings (cells write no final export)::

    python benchmarks/compare_cell.py results/2026-12-02-noisy-tiny/cells/add-grpo-clean-seed0.json NEW.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

NEW = {"truncated_prompts", "data/truncated_prompts", "perf/threads"}  # keys added since the committed cells


def clean(x: Any) -> Any:
    """``x`` without timing keys and the keys added since."""
    if isinstance(x, dict):
        timing = [k for k in x if k.startswith("perf/") or k.endswith("seconds")]
        return {k: clean(v) for k, v in x.items() if k not in NEW and k not in timing}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return x


def main() -> None:
    a, b = (clean(json.loads(Path(p).read_text())) for p in sys.argv[1:3])
    for cell in (a, b):
        cell["settings"] = [s for s in cell["settings"] if s != "checkpoint.final=false"]
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    print("identical (all but timing and keys added since)" if not diff else f"differ: {', '.join(diff)}")
    raise SystemExit(1 if diff else 0)


if __name__ == "__main__":
    main()
