import numpy as np
import pytest
import torch

from umbrella.data.dataset import window_tensor
from umbrella.data.fmri import FmriSpec, take_window


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_window_tensor_equals_take_window(tmp_path, dtype):
    spec = FmriSpec(image_size=(4, 5, 6), sequence_length=3, stride_within_seq=2)
    run = np.random.default_rng(0).normal(size=(12, 4, 5, 6)).astype(dtype)
    np.save(tmp_path / "run.npy", run)
    mapped = np.load(tmp_path / "run.npy", mmap_mode="r")
    got = window_tensor(mapped, 5, spec)
    assert got.shape == (1, 4, 5, 6, 3) and got.dtype == torch.from_numpy(run).dtype
    np.testing.assert_array_equal(got[0].float().numpy(), take_window(run, 5, spec))
    with pytest.raises(ValueError, match="frames"):
        window_tensor(mapped, 8, spec)
