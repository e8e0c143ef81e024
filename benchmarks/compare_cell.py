"""Compare a noisy-grid cell's JSON with a committed one: identical in all but timing, the keys added since, and
``checkpoint.final=false`` in the settings (cells write no final export)::

    python benchmarks/compare_cell.py results/2026-12-02-noisy-tiny/cells/add-grpo-clean-seed0.json NEW.json
"""

import json, sys
a = json.load(open(sys.argv[1])); b = json.load(open(sys.argv[2]))
NEW = {"truncated_prompts", "data/truncated_prompts", "perf/threads"}  # keys added since the committed cell


def clean(x):
    if isinstance(x, dict):
        timing = [k for k in x if k.startswith("perf/") or k.endswith("seconds")]
        return {k: clean(v) for k, v in x.items() if k not in NEW and k not in timing}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return x


ca, cb = clean(a), clean(b)
ca["settings"] = [s for s in ca["settings"] if s != "checkpoint.final=false"]
cb["settings"] = [s for s in cb["settings"] if s != "checkpoint.final=false"]
diff = [k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k)]
print("identical (all but timing and keys added since)" if not diff else f"differ: {diff}")
