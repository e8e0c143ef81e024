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
import random
import shutil
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
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
    """The checkpoint ``RUN_DIR/latest`` points at, or ``None`` when the run has none."""
    pointer = run_dir / LATEST
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / "state.json").exists():
        raise CheckpointError(
            f"{pointer} points at {path}, which is not a complete checkpoint; point it at another folder in "
            f"{run_dir / 'checkpoints'} or start a new run_dir"
        )
    return path


def load_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"checkpoint {checkpoint}: cannot read state.json ({error}); use another checkpoint"
        ) from None


def load_into(checkpoint: Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, Any]) -> None:
    """Restore module weights, optimizer and scheduler states and RNG states from ``checkpoint``."""
    load_modules(checkpoint, modules)
    load_optimizers(checkpoint, optimizers)


def _damaged(checkpoint: Path, error: Exception) -> CheckpointError:
    if isinstance(error, CheckpointError):
        return error
    return CheckpointError(f"checkpoint {checkpoint} is damaged or incomplete ({error}); use another one")


def load_modules(checkpoint: Path, modules: dict[str, torch.nn.Module]) -> None:
    """Restore the weights of ``modules`` (whole, unsharded modules) from ``checkpoint``."""
    try:
        tensors = load_file(checkpoint / "modules.safetensors")
        for key, module in modules.items():
            prefix = f"{key}."
            own = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
            missing, unexpected = module.load_state_dict(own, strict=False)
            tied = {name for name, _ in module.state_dict().items()} - {n for n, _ in _tensors(module)}
            missing = [m for m in missing if m not in tied]
            if missing or unexpected:
                raise CheckpointError(
                    f"checkpoint {checkpoint}: {key} does not match this config (missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}); resume with the config the run was started with"
                )
    except (OSError, KeyError, RuntimeError) as error:
        raise _damaged(checkpoint, error) from None


def load_optimizers(checkpoint: Path, optimizers: dict[str, Any]) -> None:
    """Restore optimizer and scheduler states and the random streams from ``checkpoint``."""
    try:
        # on the CPU: each optimizer moves its state to its parameters' device (a run may resume on another)
        saved = torch.load(checkpoint / "optimizers.pt", weights_only=True, map_location="cpu")
        for key, optimizer in optimizers.items():
            optimizer.load_state_dict(saved[key])
        set_rng_state(load_file(checkpoint / "rng.safetensors"), load_state(checkpoint)["rng"])
    except (OSError, KeyError, RuntimeError) as error:
        raise _damaged(checkpoint, error) from None
