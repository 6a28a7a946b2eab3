import numpy as np
import pytest
import torch

from slimtune.data.windows import TokenWindows
from slimtune.errors import SlimtuneError


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    return path


def test_batches_are_shifted_windows(tokens):
    w = TokenWindows(tokens, "uint16", block_size=8, batch_size=5, seed=0)
    x, y = w.next_batch()
    assert x.shape == y.shape == (5, 8) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # data is 0..999, so the target is the next integer
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)


def test_resume_continues_the_same_stream(tokens):
    a = TokenWindows(tokens, "uint16", 8, 4, seed=3)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(3)]
    b = TokenWindows(tokens, "uint16", 8, 4, seed=3)
    b.load_state_dict(state)
    for e in expected:
        assert torch.equal(b.next_batch()[0], e)


def test_ranks_take_their_rows_of_the_global_batch(tokens):
    """Two ranks on batch 2 see exactly the rows one process on batch 4 sees, batch after batch."""
    whole = TokenWindows(tokens, "uint16", 8, 4, seed=3)
    ranks = [TokenWindows(tokens, "uint16", 8, 2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        x = whole.next_batch()[0]
        r0, r1 = (w.next_batch()[0] for w in ranks)
        assert not torch.equal(r0, r1)
        assert torch.equal(torch.cat([r0, r1]), x)


def test_too_short_data(tmp_path):
    path = tmp_path / "val.bin"
    np.arange(8, dtype=np.uint16).tofile(path)
    with pytest.raises(SlimtuneError, match=r"holds 8 tokens, fewer than gpt.block_size\+1 = 9"):
        TokenWindows(path, "uint16", block_size=8, batch_size=2, seed=0)
    with pytest.raises(SlimtuneError, match="missing"):
        TokenWindows(tmp_path / "nope.bin", "uint16", 8, 2, 0)
