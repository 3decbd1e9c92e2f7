"""BrainCollator's image stacking: one copy into a contiguous batch, dtype cast, shared memory in workers."""

import pytest
import torch
from torch.utils.data import DataLoader

from umbrella.data.collate import BrainCollator, stack_images


def _sample(images, n=3):
    ids = torch.arange(1, n + 1)
    return {"input_ids": ids, "attention_mask": torch.ones(n, dtype=torch.long),
            "labels": ids.clone(), "images": images, "id": f"r{n}"}


def _windows(n=3, t=4, side=6, dtype=torch.float32):
    """(1, D, H, W, T) views of (T, D, H, W) memory, as a cached rsfMRI window is stored."""
    runs = [torch.randn(t, side, side, side).to(dtype) for _ in range(n)]
    return runs, [r.permute(1, 2, 3, 0)[None] for r in runs]


def test_stored_order_windows_stack_into_a_contiguous_batch():
    runs, views = _windows()
    out = stack_images(views)
    assert out.shape == (3, 1, 6, 6, 6, 4) and out.is_contiguous()
    assert torch.equal(out, torch.stack(views))
    assert torch.equal(out[1, 0].permute(3, 0, 1, 2), runs[1])


def test_dtype_is_promoted_or_cast_in_the_same_copy():
    _, half = _windows(n=2, dtype=torch.float16)
    _, full = _windows(n=1)
    assert stack_images(half + full).dtype == torch.float32
    assert stack_images(half).dtype == torch.float16
    cast = BrainCollator(0, image_dtype=torch.float32)([_sample([("rsfMRI", v)]) for v in half])
    pixels = cast["pixel_values"]["rsfMRI"]
    assert pixels.dtype == torch.float32 and torch.equal(pixels, torch.stack(half).float())


def test_shape_mismatch_names_the_modality_and_both_shapes():
    with pytest.raises(ValueError, match=r"T1 images of shapes \(1, 4, 4, 4\) and \(1, 4, 4, 5\)"):
        BrainCollator(0)([_sample([("T1", torch.zeros(1, 4, 4, 4))]),
                          _sample([("T1", torch.zeros(1, 4, 4, 5))])])


class _Windows(torch.utils.data.Dataset):
    def __init__(self):
        _, self.views = _windows(n=4)

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return _sample([("rsfMRI", self.views[i])])


def test_batches_from_a_worker_arrive_in_shared_memory():
    data = _Windows()
    loader = DataLoader(data, batch_size=2, num_workers=1, collate_fn=BrainCollator(0))
    batches = list(loader)
    pixels = batches[1]["pixel_values"]["rsfMRI"]
    assert pixels.is_shared() and pixels.is_contiguous()
    assert torch.equal(pixels, torch.stack(data.views[2:]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_pin_memory_needs_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        BrainCollator(0, pin_memory=True)
