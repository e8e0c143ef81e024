"""Atomic checkpoints that resume a run exactly, and that never unpickle code when loaded.

Layout of ``RUN_DIR/checkpoints/step_000040/``::

    policy/              the policy and its tokenizer (``save_pretrained``, safetensors): loadable by ``dfpo eval``
    modules.safetensors  the trained modules besides the policy (critic head and trunk, FlowRL's log-partition)
    optimizers.pt        optimizer and scheduler state dicts (tensors and numbers only: ``weights_only=True``)
    rng.safetensors      torch's CPU (and CUDA) generator states
    state.json           step, data position, bad-step count, Python's and NumPy's RNG states, the config

A checkpoint is written to a hidden temporary folder and renamed into place; then ``RUN_DIR/latest`` (the
checkpoint's folder name) is replaced atomically. A crash at any moment leaves the previous checkpoint and
pointer intact.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what to do about it."""


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, json_state)``: torch's generator states and Python's and NumPy's, JSON-serialisable."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    run_dir: Path,
    step: int,
    policy: Any,
    tokenizer: Any,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
    whole: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, and prune to the ``keep`` newest.

    ``whole`` holds the states of sharded models gathered whole (``policy``, ``modules``, ``optimizers``: see
    :mod:`dfpo.distributed`); they are written in place of the models' own, in the same layout, so that any
    number of processes, sharded or not, resumes from the checkpoint."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*"):  # temporary folders of writes that a kill interrupted
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{step:06d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        whole = whole or {}
        policy.save_pretrained(tmp / "policy", **({"state_dict": whole["policy"]} if "policy" in whole else {}))
        tokenizer.save_pretrained(tmp / "policy")
        if "modules" in whole:
            tensors = {f"{key}.{p}": t.contiguous() for key, sd in whole["modules"].items() for p, t in sd.items()}
        else:
            tensors = {f"{key}.{p}": t.detach().contiguous() for key, m in modules.items() for p, t in _tensors(m)}
        save_file(tensors, tmp / "modules.safetensors")
        optimizer_states = whole.get("optimizers") or {k: o.state_dict() for k, o in optimizers.items()}
        torch.save(optimizer_states, tmp / "optimizers.pt")
        rng_tensors, rng_json = rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": rng_json}, indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pointer = run_dir / f".{LATEST}.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, run_dir / LATEST)
    for old in _by_step(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _by_step(root: Path) -> list[Path]:
    """The ``step_N`` folders under ``root``, by step number (not by name: step_1000000 follows step_999999)."""
    found = [
        (int(m.group(1)), p) for p in root.glob("step_*") if p.is_dir() and (m := re.fullmatch(r"step_(\d+)", p.name))
    ]
    return [p for _, p in sorted(found)]


_FILES = ("state.json", "modules.safetensors", "optimizers.pt", "rng.safetensors")


def _complete(path: Path) -> bool:
    return all((path / f).exists() for f in _FILES) and (path / "policy").is_dir()


def _tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    # parameters and persistent buffers, shared (tied) tensors once each: safetensors refuses aliases
    seen: set[int] = set()
    out = []
    for name, tensor in module.state_dict(keep_vars=False).items():
        if tensor.data_ptr() in seen and tensor.numel():
            continue
        seen.add(tensor.data_ptr())
        out.append((name, tensor))
    return out


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``RUN_DIR/latest`` points at, or ``None`` when the run has none. A missing or broken pointer
    (deleted, damaged, or naming a folder that is not a complete checkpoint of this run) is recovered from the newest
    complete checkpoint, said in one line, and rewritten."""
    pointer = run_dir / LATEST
    root = run_dir / "checkpoints"
    problem = None
    if pointer.exists():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError) as error:
            name, problem = "", f"cannot be read ({error})"
        path = root / name
        if problem is None and (not re.fullmatch(r"step_\d+", name) or not _complete(path)):
            problem = f"names {name!r}, which is not a complete checkpoint in {root}"
        if problem is None:
            return path
    complete = [p for p in _by_step(root) if _complete(p)] if root.is_dir() else []
    if not complete:
        if problem is not None:
            raise CheckpointError(
                f"{pointer} {problem}, and {root} holds no complete checkpoint: start over in a new run_dir (or "
                "delete this one)"
            )
        return None
    newest = complete[-1]
    why = "is missing" if problem is None else problem
    print(f"resume: {pointer} {why}; using the newest complete checkpoint, {newest.name}", file=sys.stderr)
    tmp = run_dir / f".{LATEST}.tmp"
    tmp.write_text(newest.name + "\n")
    os.replace(tmp, pointer)
    return newest


def holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds an earlier run's checkpoints or metrics (which a fresh start would overwrite)."""
    root = run_dir / "checkpoints"
    return (run_dir / LATEST).exists() or bool(root.is_dir() and _by_step(root)) or (run_dir / "metrics.jsonl").exists()


def load_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / "state.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _damaged(checkpoint / "state.json", error) from None


def load_into(checkpoint: Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, Any]) -> None:
    """Restore module weights, optimizer and scheduler states and RNG states from ``checkpoint``."""
    load_modules(checkpoint, modules)
    load_optimizers(checkpoint, optimizers)


def _damaged(path: Path, error: Exception) -> CheckpointError:
    if isinstance(error, CheckpointError):
        return error
    # the loader's own message, first line only; torch.load's advice to load with weights_only=False (which runs
    # code from the file) is not for a damaged checkpoint
    lines = str(error).strip().splitlines() or [""]
    detail = lines[0][:200] + (" ..." if len(lines) > 1 or len(lines[0]) > 200 else "")
    if isinstance(error, pickle.UnpicklingError):
        detail = "not a readable tensor file"
    return CheckpointError(
        f"{path} is damaged or incomplete ({type(error).__name__}: {detail}); resume from another checkpoint "
        f"(resume=<folder in {path.parent.parent}>) or start over in a new run_dir"
    )


def check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN or inf: a run resumed from them could only diverge."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(
            f"{path} holds NaN or inf weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); resume from an "
            "earlier checkpoint (resume=<folder>) or start over"
        )


def load_modules(checkpoint: Path, modules: dict[str, torch.nn.Module]) -> None:
    """Restore the weights of ``modules`` (whole, unsharded modules) from ``checkpoint``."""
    path = checkpoint / "modules.safetensors"
    try:
        tensors = load_file(path)
    except Exception as error:  # safetensors' own error type, OSError, ...
        raise _damaged(path, error) from None
    check_finite(path, tensors)
    for key, module in modules.items():
        prefix = f"{key}."
        own = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
        try:
            missing, unexpected = module.load_state_dict(own, strict=False)
        except RuntimeError as error:  # a shape that does not match
            raise CheckpointError(
                f"{path}: {key} does not match this config ({error}); resume with the config the run was started with"
            ) from None
        tied = {name for name, _ in module.state_dict().items()} - {n for n, _ in _tensors(module)}
        missing = [m for m in missing if m not in tied]
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {checkpoint}: {key} does not match this config (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); resume with the config the run was started with"
            )


def load_optimizers(checkpoint: Path, optimizers: dict[str, Any]) -> None:
    """Restore optimizer and scheduler states and the random streams from ``checkpoint``."""
    path = checkpoint / "optimizers.pt"
    try:
        # on the CPU: each optimizer moves its state to its parameters' device (a run may resume on another)
        saved = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # UnpicklingError, a truncated zip (RuntimeError), OSError, ...
        raise _damaged(path, error) from None
    try:
        for key, optimizer in optimizers.items():
            optimizer.load_state_dict(saved[key])
    except (KeyError, ValueError, RuntimeError, TypeError) as error:
        raise CheckpointError(
            f"{path}: the optimizer states do not match this run ({type(error).__name__}: {error}); resume with the "
            "config the run was started with"
        ) from None
    path = checkpoint / "rng.safetensors"
    try:
        set_rng_state(load_file(path), load_state(checkpoint)["rng"])
    except CheckpointError:
        raise
    except Exception as error:
        raise _damaged(path, error) from None
