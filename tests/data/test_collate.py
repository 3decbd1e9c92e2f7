import torch

from umbrella.data.collate import BrainCollator
from umbrella.data.prompts import IGNORE_INDEX


def _sample(n, images):
    ids = torch.arange(1, n + 1)
    return {"input_ids": ids, "attention_mask": torch.ones(n, dtype=torch.long),
            "labels": ids.clone(), "images": images, "id": f"r{n}"}


def test_pads_text_and_stacks_images_per_modality():
    t1a, t1b, fa = torch.zeros(1, 4, 4, 4), torch.ones(1, 4, 4, 4), torch.full((1, 2, 2, 2), 2.0)
    batch = BrainCollator(pad_token_id=0, pad_to_multiple_of=8)(
        [_sample(3, [("T1", t1a)]), _sample(5, [("dMRI", fa), ("T1", t1b)])])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 0, 0, 0, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert batch["labels"][0, 3:].tolist() == [IGNORE_INDEX] * 5
    assert batch["pixel_values"]["T1"].shape == (2, 1, 4, 4, 4)
    assert torch.equal(batch["pixel_values"]["T1"][1], t1b)
    assert batch["image_order"] == [("T1", 0), ("dMRI", 0), ("T1", 1)]
    assert batch["ids"] == ["r3", "r5"]


def test_left_padding_for_generation():
    batch = BrainCollator(pad_token_id=9, padding_side="left")([_sample(2, []), _sample(4, [])])
    assert batch["input_ids"][0].tolist() == [9, 9, 1, 2]
    assert batch["attention_mask"][0].tolist() == [0, 0, 1, 1]
    assert batch["pixel_values"] == {} and batch["image_order"] == []
