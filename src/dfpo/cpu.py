"""How many torch threads to run on a CPU that other processes may share.

With more threads than free cores, every parallel region waits for a thread that shares its core with another
process: on a 2-core machine with one busy process beside it, a tiny-model step ran 3-4x slower with 2 threads
(spinning or not) and evaluation up to 6x, while one thread ran as fast as on the idle machine
(``benchmarks/under_load.py``). ``threads=0`` therefore runs one thread per core that other processes leave free,
decided when the run starts.
"""

from __future__ import annotations

import os
import sys
import time

import torch

_TORCH_DEFAULT = torch.get_num_threads()  # before any run in this process sets it


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _busy_ticks(cpus: list[int]) -> int | None:
    """Clock ticks ``cpus`` spent busy since boot (``/proc/stat``), or None where there is no such file."""
    try:
        with open("/proc/stat") as f:
            lines = f.readlines()
    except OSError:
        return None
    wanted, busy = {f"cpu{i}" for i in cpus}, 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:
            # user nice system idle iowait irq softirq steal (guest time is already in user)
            values = [int(v) for v in fields[1:9]]
            busy += sum(values) - values[3] - values[4]
    return busy


def busy_elsewhere(window: float = 0.3) -> float | None:
    """Cores of this process's CPU set that other processes kept busy over ``window`` seconds (e.g. 1.0: one
    core's worth), or None where it cannot be measured (no ``/proc/stat``)."""
    cpus = _cpus()
    before, own_before, start = _busy_ticks(cpus), time.process_time(), time.monotonic()
    if before is None:
        return None
    time.sleep(window)
    after, own, elapsed = _busy_ticks(cpus), time.process_time() - own_before, time.monotonic() - start
    ticks = os.sysconf("SC_CLK_TCK")
    return max(0.0, ((after or before) - before) / ticks - own) / elapsed


def default_threads() -> int:
    """torch's thread count when this module was imported (its default: the physical cores, or
    ``OMP_NUM_THREADS``), so that a run after one that took fewer threads in the same process starts from the
    default again."""
    return _TORCH_DEFAULT


def free_core_threads(default: int) -> tuple[int, float | None]:
    """Threads for this process: ``default`` (torch's choice, the physical cores) less the cores other processes
    keep busy (a core half busy or more counts), at least 1. Returns the count and the busy cores measured."""
    busy = busy_elsewhere()
    if busy is None:
        return default, None
    free = len(_cpus()) - int(busy + 0.5)
    return max(1, min(default, free)), busy


def set_threads(requested: int, kept: int | None = None, say: bool = True) -> int:
    """Set torch's CPU threads: ``requested`` when > 0; else ``kept`` (a resumed run's count) when given; else
    one per free core, saying so (when ``say``) if that is fewer than the default. Returns the count."""
    if requested > 0 or kept:
        torch.set_num_threads(requested if requested > 0 else int(kept or 0))
        return torch.get_num_threads()
    default = default_threads()
    threads, busy = free_core_threads(default)
    if threads < default and say:
        print(f"threads: {threads} torch threads, not {default}: other processes keep {busy:.1f} of this machine's "
              "cores busy, and more threads than free cores run several times slower (set threads=N to choose)",
              file=sys.stderr)  # fmt: skip
    torch.set_num_threads(threads)
    return threads
