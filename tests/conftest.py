import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def right_padded_mask(lengths: list[int], max_len: int) -> torch.Tensor:
    """``[B, T]`` float mask with ``lengths[i]`` leading ones per row."""
    return (torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]).float()
