import os

import pytest
import torch

# Under pytest-xdist (`make test` runs one worker per core) each worker takes an equal share of the cores: torch's
# default of one thread per core in every worker would put two threads on each core, several times slower (see
# dfpo/cpu.py). Set before dfpo.cpu records torch's default, and in the environment for the processes tests start.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _SHARE = max(1, torch.get_num_threads() // _WORKERS)
    torch.set_num_threads(_SHARE)
    os.environ["OMP_NUM_THREADS"] = str(_SHARE)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def straight_and_resumed(settings: list[str], steps: int, tmp_path) -> tuple:
    """Run folders of ``dfpo train`` for ``steps`` steps straight, and for 1 step then resumed to ``steps``
    (``settings`` must checkpoint every step)."""
    from dfpo.cli import main

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", *settings, f"steps={steps}", f"run_dir={straight}"]) == 0
    assert main(["train", *settings, "steps=1", f"run_dir={resumed}"]) == 0
    assert main(["train", *settings, f"steps={steps}", f"run_dir={resumed}", "resume=auto"]) == 0
    return straight, resumed


def right_padded_mask(lengths: list[int], max_len: int) -> torch.Tensor:
    """``[B, T]`` float mask with ``lengths[i]`` leading ones per row."""
    return (torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]).float()


@pytest.fixture(autouse=True)
def idle_cpu(request, monkeypatch):
    """Runs in a test start with threads decided as on an idle machine: two runs a test compares would otherwise
    pick their thread counts from whatever else the machine runs then (``tests/test_cpu.py`` measures for real)."""
    if "real_cpu" not in request.keywords:
        monkeypatch.setattr("dfpo.cpu.busy_elsewhere", lambda window=0.3: 0.0)
