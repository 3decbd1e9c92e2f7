"""model.center_inputs: the training population's mean image is subtracted before the patch
embedding; the statistics are exact running sums, frozen in eval mode, saved and reloaded."""

import numpy as np
import pytest
import torch

from umbrella.config import ModelConfig
from umbrella.data.prompts import PromptEncoder
from umbrella.data.records import Turn
from umbrella.data.tokenizer import train_tokenizer
from umbrella.model.build import build_brain_llava, load_brain_llava
from umbrella.model.modeling_brain_vit import PopulationCentering

GEOM = {"T1": {"image_size": [16, 16, 16], "patch_size": [8, 8, 8]},
        "rsfMRI": {"image_size": [8, 8, 8, 4], "patch_size": [8, 8, 8, 2]}}


@pytest.mark.parametrize("shape", [(1, 6, 5, 4), (1, 4, 3, 5, 3)])
def test_running_statistics_equal_the_whole_populations(shape):
    torch.manual_seed(0)
    batches = [torch.randn(n, *shape) * 3 + torch.linspace(0, 5, shape[1]).view(1, 1, -1, *[1] * (len(shape) - 2))
               for n in (3, 1, 5, 2)]
    center = PopulationCentering(shape[:4]).train()
    for b in batches:
        center(b)
    every = torch.cat(batches).double()
    if every.dim() == 6:  # time frames count as more samples of each voxel
        every = every.permute(0, 5, 1, 2, 3, 4).reshape(-1, *shape[:4])
    assert center.count.item() == len(every)
    # each batch's moments are float32 (the combination float64): float32 agreement
    torch.testing.assert_close(center.mean, every.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(center.m2 / (center.count - 1), every.var(0), rtol=1e-5, atol=1e-5)
    out = center.eval()(batches[0])
    scale = every.var(0).mean().sqrt()
    mean = every.mean(0) if len(shape) == 4 else every.mean(0)[..., None]
    torch.testing.assert_close(out.double(), (batches[0].double() - mean) / scale, atol=1e-5, rtol=1e-5)


def test_eval_mode_and_untrained_leave_the_statistics_alone():
    center = PopulationCentering((1, 2, 2, 2))
    x = torch.randn(4, 1, 2, 2, 2)
    assert torch.equal(center.eval()(x), x)  # no statistics yet: identity
    assert center.count.item() == 0
    center.train()(x)
    before = center.mean.clone()
    center.eval()(torch.randn(4, 1, 2, 2, 2) + 10)
    assert torch.equal(center.mean, before) and center.count.item() == 4


def test_centering_is_saved_with_the_weights_and_reloads_exactly(tmp_path):
    tok = train_tokenizer(["What is the sex of this subject? male female"] * 4, 300)
    model = build_brain_llava(ModelConfig(center_inputs=True), GEOM, tok, seed=0)
    embeds = model.model.vision_tower.embeddings
    assert embeds["T1"].center is not None and embeds["rsfMRI"].center is not None
    assert embeds["T1"].center.count.item() == 0  # a fresh model starts with empty statistics
    e = PromptEncoder(tok).encode([Turn("user", "<image>\nWhat is the sex?"), Turn("assistant", "male")], [8])
    ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
    model.train()
    for step in range(3):
        pixels = {"T1": torch.randn(1, 1, 16, 16, 16) + step}
        model(input_ids=ids, pixel_values=pixels, image_order=[("T1", 0)], labels=labels).loss.backward()
    assert embeds["T1"].center.count.item() == 3 and embeds["rsfMRI"].center.count.item() == 0
    model.eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, _ = load_brain_llava(tmp_path)
    centre = again.model.vision_tower.embeddings["T1"].center
    assert centre.count.item() == 3
    torch.testing.assert_close(centre.mean, embeds["T1"].center.mean)
    pixels = {"T1": torch.randn(1, 1, 16, 16, 16)}
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels, image_order=[("T1", 0)]).logits
        b = again(input_ids=ids, pixel_values=pixels, image_order=[("T1", 0)]).logits
    assert torch.equal(a, b)


def test_on_by_default_and_off_on_request():
    tok = train_tokenizer(["What is the sex of this subject? male female"] * 4, 300)
    assert all(e.center is not None for e in build_brain_llava(
        ModelConfig(), GEOM, tok, seed=0).model.vision_tower.embeddings.values())
    model = build_brain_llava(ModelConfig(center_inputs=False), GEOM, tok, seed=0)
    assert all(e.center is None for e in model.model.vision_tower.embeddings.values())
    assert not [n for n in model.state_dict() if ".center." in n]
    assert np.isfinite(sum(p.sum().item() for p in model.parameters()))
