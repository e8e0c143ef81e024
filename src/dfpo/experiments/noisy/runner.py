"""Running the grid: tuning, then the cells, a few processes at a time, resumable; the record of the machine
and the code."""

from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dfpo.experiments.noisy.cell import _final_true_reward, _write_json, run_cell
from dfpo.experiments.noisy.grid import (
    SCALES,
    Cell,
    NoisyConfig,
    Scale,
    _code_version,
    _grid_cells,
    _split,
    variant_settings,
)
from dfpo.experiments.noisy.report import write_report
from dfpo.options import ConfigError, check_writable
from dfpo.training.critic_options import upgrade_keys

# -- the grid ----------------------------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "code": _code_version(),
    }


def _budget(config: NoisyConfig, scale: Scale) -> dict[str, Any]:
    """What every cell shares; a results folder holds one budget (a different one needs another ``out``)."""
    return {
        "scale": config.scale,
        "steps": config.steps or scale.steps,
        "eval_limit": config.eval_limit or scale.eval_limit,
        "eval_every": scale.eval_every if config.eval_every < 0 else config.eval_every,
        "settings": [*scale.settings, *config.settings.split()],
        "tune": _split(config.tune),
        "tune_seed": config.tune_seed,
    }


def _cell_settings(scale: Scale, budget: dict[str, Any], cell: Cell) -> list[str]:
    domain = scale.domains[cell.domain]
    cell.algo, extra = variant_settings(scale, cell.variant, budget["settings"])
    return [
        f"algo={cell.algo}", f"model={scale.model}", f"task={domain.task}", f"noise={cell.noise}",
        f"seed={cell.seed}", f"steps={budget['steps']}", f"rollout.max_new_tokens={domain.max_new_tokens}",
        *(f"task_options.{k}={v}" for k, v in domain.options.items()), *_curve_settings(budget),
        "log.progress=false", "log.samples_every=0",
        f"checkpoint.every={scale.checkpoint_every}", "checkpoint.keep=1", "checkpoint.final=false",
        *domain.settings, *budget["settings"], *extra, *([f"actor.lr={cell.lr}"] if cell.lr else []),
    ]  # fmt: skip


def _curve_settings(budget: dict[str, Any]) -> list[str]:
    """The trainer's own held-out evaluation, greedy, on the training domain's eval split (before training and every
    ``eval_every`` steps): the accuracy curve of the stability figures."""
    every = budget.get("eval_every", 0)
    if not every:
        return ["eval.splits="]
    return ["eval.splits=eval", f"eval.every={every}", f"eval.limit={budget['eval_limit']}", "eval.samples=0"]


def _cell_process(spec: dict[str, Any], log: str) -> None:
    """A cell's process, forked from the fork server: its own session (so the grid can stop it with everything it
    started), its output in ``log``."""
    os.setsid()
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    run_cell(spec)
    sys.stdout.flush()
    sys.stderr.flush()


def _cell_context() -> Any:
    """Cells start from a fork server that has imported :mod:`dfpo.experiments.preload` (torch, transformers, the
    trainer): a fresh process per cell, without the seconds of imports each (about 9 s of a tiny cell's 80)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["dfpo.experiments.preload"])
    return context


class _Runner:
    """Runs cells in child processes, ``workers`` at a time, with a progress bar and ETA."""

    def __init__(self, out: Path, workers: int, total: int, done: int, on_done: Any = None) -> None:
        from tqdm import tqdm

        self.out, self.workers, self.on_done = out, workers, on_done
        self.bar = tqdm(total=total, initial=done, desc="cells", unit="cell", file=sys.stderr, dynamic_ncols=True)
        self.running: dict[str, Any] = {}
        self.failed: list[str] = []
        self.lock = threading.Lock()
        self.stopping = False
        self.context = _cell_context()

    def _run(self, spec: dict[str, Any]) -> None:
        if self.stopping:
            return
        log = self.out / "logs" / f"{spec['id']}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        child = self.context.Process(target=_cell_process, args=(spec, str(log)), name=spec["id"])
        with self.lock:
            if self.stopping:
                return
            child.start()
            self.running[spec["id"]] = child
            self.bar.set_postfix_str(", ".join(self.running), refresh=True)
        child.join()
        code = child.exitcode
        with self.lock:
            self.running.pop(spec["id"], None)
            if code != 0 and not self.stopping:
                self.failed.append(f"{spec['id']} (exit {code}; log: {log})")
                self.bar.write(f"cell {spec['id']} failed (exit {code}); its log: {log}")
            elif code == 0:
                self.bar.update(1)
                log.unlink(missing_ok=True)  # the cell's record holds its results; logs are kept for failures
                if self.on_done is not None:
                    self.on_done(self.bar.n)
            self.bar.set_postfix_str(", ".join(self.running), refresh=True)

    def run(self, specs: list[dict[str, Any]]) -> None:
        pool = ThreadPoolExecutor(max_workers=self.workers)
        try:
            for future in [pool.submit(self._run, s) for s in specs]:
                while not future.done():
                    time.sleep(0.2)
                future.result()
        except KeyboardInterrupt:
            self.stopping = True
            with self.lock:
                for child in self.running.values():
                    try:
                        os.killpg(child.pid, signal.SIGTERM)
                    except ProcessLookupError:  # ended, or not yet in its own session
                        child.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            self.bar.close()
            raise
        pool.shutdown(wait=True)

    def close(self) -> None:
        self.bar.close()


def run_noisy(config: NoisyConfig, command: str) -> dict[str, Any]:
    if config.scale not in SCALES:
        raise ConfigError(f"scale={config.scale!r}: valid scales are {', '.join(SCALES)}")
    scale = SCALES[config.scale]
    out = Path(config.out or f"results/{datetime.date.today().isoformat()}-noisy-{config.scale}")
    if config.report_only:
        if not (out / "grid.json").exists():
            raise ConfigError(f"out={out}: no grid.json there (run the grid first, or point out= at its folder)")
        return write_report(out)
    if config.workers < 1:
        raise ConfigError(f"workers={config.workers}: must be at least 1")
    check_writable(out, "out", folder=True)
    variants, cells = _grid_cells(config, scale)
    budget = _budget(config, scale)
    threads = config.threads or max(1, (os.cpu_count() or 1) // config.workers)

    def spec(cell: Cell) -> dict[str, Any]:
        settings = [] if cell.variant == "base" else _cell_settings(scale, budget, cell)
        return {
            "id": cell.id, "scale": config.scale, "domain": cell.domain, "variant": cell.variant, "algo": cell.algo,
            "noise": cell.noise, "seed": cell.seed, "tuning": cell.tuning, "lr": cell.lr, "settings": settings,
            "threads": threads, "eval_limit": budget["eval_limit"], "run_dir": str(out / "runs" / cell.id),
            "out": str(out / "cells" / f"{cell.id}.json"),
        }  # fmt: skip

    def pending(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [s for s in specs if not Path(s["out"]).exists()]

    # tuning first: each variant's actor learning rate, picked by the true training reward of its last steps
    domains = sorted({c.domain for c in cells})
    tune_specs = [
        spec(Cell(domain, variant, "clean", config.tune_seed, tuning=True, lr=lr))
        for variant in variants
        for domain in domains
        for lr in budget["tune"]
    ]
    first = [spec(Cell("", "base", "", 0)), *tune_specs]
    _check_settings([*first[1:], *(spec(c) for c in cells)])

    grid_path = out / "grid.json"
    if grid_path.exists():
        grid = json.loads(grid_path.read_text())
        # a grid begun under the earlier flat critic keys (critic.samples=...) holds the same settings
        grid["budget"]["settings"] = upgrade_keys(grid["budget"]["settings"])
        if grid["budget"] != budget:
            raise ConfigError(
                f"out={out} holds a grid with another budget ({grid['budget']}); give the same scale, steps, "
                "eval_limit, settings and tune to resume it, or choose another out"
            )
        grid["commands"] = [*grid.get("commands", []), command]
    else:
        grid = {"commands": [command], "budget": budget, "machine": _machine(), "started": time.time()}
    grid["variants"] = sorted(set(grid.get("variants", [])) | set(variants))
    main_ids = [out / "cells" / f"{c.id}.json" for c in cells]
    total = len(first) + len(cells)
    done = total - len(pending(first)) - sum(not p.exists() for p in main_ids)
    # a grid resumed on another machine or from other code says so: each invocation records its own
    session = {"command": command, "workers": config.workers, "machine": _machine(), "started": time.time(),
               "cells_before": done}  # fmt: skip
    grid["sessions"] = [*grid.get("sessions", []), session]

    def record(cells_after: int) -> None:
        # after every finished cell, so that an invocation killed outright (SIGKILL, the machine lost) keeps its
        # wall time up to its last cell
        session.update(finished=time.time(), cells_after=cells_after)
        _write_json(grid_path, grid)

    record(done)
    runner = _Runner(out, config.workers, total, done, on_done=record)
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the grid as Ctrl-C does: cells are kept
    try:
        runner.run(pending(first))
        if budget["tune"]:
            chosen = _chosen_lrs(tune_specs)
            _write_json(out / "tuning.json", {f"{v}/{d}": lr for (v, d), lr in chosen.items()})
            for c in cells:
                c.lr = chosen[(c.variant, c.domain)]
        runner.run(pending([spec(c) for c in cells]))
    except KeyboardInterrupt:
        print(f"\nnoisy: interrupted; finished cells are kept in {out}/cells: run the same command to resume",
              file=sys.stderr)  # fmt: skip
        raise
    finally:
        runner.close()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
        # each invocation's wall time, so that the grid's is on record however many times it was resumed
        with runner.lock:
            record(runner.bar.n)
    report = write_report(out)
    if runner.failed:
        raise CellFailed(
            f"{len(runner.failed)} cell(s) failed: {'; '.join(runner.failed)}. The other cells' results are in {out}; "
            "fix the cause shown in the log and run the same command again to run only what is missing"
        )
    return report


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class CellFailed(RuntimeError):
    """A grid cell's process ended with an error (its log names it)."""


def _check_settings(specs: list[dict[str, Any]]) -> None:
    """Every cell's ``dfpo train`` settings, checked before any cell runs."""
    from dfpo.training.config import build_config

    seen = set()
    for s in specs:
        key = tuple(x for x in s["settings"] if not x.startswith(("seed=", "noise=")))
        if key in seen:
            continue
        seen.add(key)
        try:
            build_config(s["settings"])
        except ConfigError as error:
            raise ConfigError(f"cell {s['id']}: {error}") from None


def _chosen_lrs(tune_specs: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """Per (variant, domain), the learning rate whose tuning run ended with the highest true training reward."""
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for s in tune_specs:
        path = Path(s["out"])
        if not path.exists():
            raise CellFailed(f"tuning cell {s['id']} did not finish: run the same command again")
        score = _final_true_reward(json.loads(path.read_text()))
        key = (s["variant"], s["domain"])
        if key not in best or score > best[key][0]:
            best[key] = (score, s["lr"])
    return {k: lr for k, (_, lr) in best.items()}
