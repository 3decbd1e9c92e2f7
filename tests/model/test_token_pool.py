"""Optional token pooling before the projector (build_brain_llava(token_pool=...))."""

import pytest
import torch

from umbrella.config import ModelConfig
from umbrella.data.prompts import PromptEncoder
from umbrella.data.records import Turn
from umbrella.data.tokenizer import train_tokenizer
from umbrella.errors import ModelError
from umbrella.model.build import (
    build_brain_llava,
    load_brain_llava,
    pool_tokens,
    pooled_tokens,
    tokens_per_image,
)

GEOM = {"T1": {"image_size": [32, 32, 32], "patch_size": [8, 8, 8]},
        "rsfMRI": {"image_size": [16, 16, 16, 4], "patch_size": [4, 4, 4, 4]}}


@pytest.fixture(scope="module")
def parts():
    tok = train_tokenizer(["What is the sex of this subject? male female"] * 4, 300)
    model = build_brain_llava(ModelConfig(), GEOM, tok, seed=0, token_pool=2).eval()
    return model, tok, PromptEncoder(tok)


def _ids(enc, tokens, n=2):
    e = enc.encode([Turn("user", "<image>\nWhat is the sex?"), Turn("assistant", "male")], [tokens])
    return torch.tensor([e.input_ids] * n)


def test_token_counts_follow_the_pool(parts):
    model, _, _ = parts
    assert tokens_per_image(model, "T1") == 8  # 4³ grid -> 2³
    assert tokens_per_image(model, "rsfMRI") == 8  # 1 time block x 4³ -> 2³
    assert pooled_tokens({"image_size": [96] * 3, "patch_size": [16] * 3}, 2) == 27
    assert pooled_tokens({"image_size": [96] * 3, "patch_size": [16] * 3}) == 216
    assert pooled_tokens({"image_size": [120] * 3, "patch_size": [10] * 3}, 2) == 216
    feats = model.image_features({"T1": torch.randn(2, 1, 32, 32, 32),
                                  "rsfMRI": torch.randn(1, 1, 16, 16, 16, 4)},
                                 [("T1", 0), ("rsfMRI", 0), ("T1", 1)])
    assert [tuple(f.shape) for f in feats] == [(8, 128)] * 3


def test_pool_averages_each_window_of_the_grid():
    spec = {"image_size": [8, 8, 8, 6], "patch_size": [2, 2, 2, 3]}  # 2 time blocks x 4³ grid
    x = torch.arange(2 * 128 * 3, dtype=torch.float32).reshape(2, 128, 3)
    out = pool_tokens(x, spec, (2, 2, 2))
    assert out.shape == (2, 16, 3)
    grid = x[1, 64:].reshape(4, 4, 4, 3)  # second image, second time block
    assert torch.allclose(out[1, 8], grid[:2, :2, :2].mean(dim=(0, 1, 2)))
    assert torch.allclose(out[1, 15], grid[2:, 2:, 2:].mean(dim=(0, 1, 2)))


def test_pooled_model_trains_saves_and_reloads_exactly(parts, tmp_path):
    model, tok, enc = parts
    ids = _ids(enc, 8)
    x = torch.randn(2, 1, 32, 32, 32)
    out = model(input_ids=ids, pixel_values={"T1": x}, image_order=[("T1", 0), ("T1", 1)],
                labels=ids)
    assert torch.isfinite(out.loss)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, _ = load_brain_llava(tmp_path)
    assert list(again.config.vision_token_pool) == [2, 2, 2]
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values={"T1": x}, image_order=[("T1", 0), ("T1", 1)]).logits
        b = again(input_ids=ids, pixel_values={"T1": x}, image_order=[("T1", 0), ("T1", 1)]).logits
    assert torch.equal(a, b)


def test_unpooled_counts_raise_with_both_numbers(parts):
    model, _, enc = parts
    with pytest.raises(ModelError, match=r"128 image tokens but the 2 images give 16 features"):
        model(input_ids=_ids(enc, 64), pixel_values={"T1": torch.randn(2, 1, 32, 32, 32)},
              image_order=[("T1", 0), ("T1", 1)])


def test_pool_that_does_not_divide_the_grid_is_refused():
    tok = train_tokenizer(["male female"] * 4, 300)
    with pytest.raises(ModelError, match=r"token grid \(3, 4, 4\).*token_pool \(2, 2, 2\)"):
        build_brain_llava(ModelConfig(), {"T1": {"image_size": [24, 32, 32],
                                                 "patch_size": [8, 8, 8]}}, tok, token_pool=2)
    with pytest.raises(ModelError, match="positive integer"):
        build_brain_llava(ModelConfig(), GEOM, tok, token_pool=0)


def test_default_is_off():
    tok = train_tokenizer(["male female"] * 4, 300)
    model = build_brain_llava(ModelConfig(), GEOM, tok, seed=0)
    assert not hasattr(model.config, "vision_token_pool")
    assert tokens_per_image(model, "T1") == 64


@pytest.mark.parametrize(("pool", "tokens"), [(None, 64), (2, 8)])
def test_plain_tensor_pixels_take_the_dict_path(pool, tokens):
    tok = train_tokenizer(["What is the sex of this subject? male female"] * 4, 300)
    enc = PromptEncoder(tok)
    model = build_brain_llava(ModelConfig(), {"T1": GEOM["T1"]}, tok, seed=0, token_pool=pool).eval()
    ids, x = _ids(enc, tokens), torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values=x).logits
        routed = model(input_ids=ids, pixel_values={"T1": x},
                       image_order=[("T1", 0), ("T1", 1)]).logits
    assert torch.equal(plain, routed)


def test_pool_all_gives_each_image_the_mean_of_its_tokens(tmp_path):
    """token_pool="all": one token per image (and per rsfMRI time block), the projector applied
    to the mean of the tower's tokens; kept through save / reload."""
    assert pooled_tokens({"image_size": [48, 64, 48], "patch_size": [16] * 3}, "all") == 1
    assert pooled_tokens({"image_size": [16, 16, 16, 8], "patch_size": [4, 4, 4, 4]}, "all") == 2
    tok = train_tokenizer(["What is the sex of this subject? male female"] * 4, 300)
    enc = PromptEncoder(tok)
    model = build_brain_llava(ModelConfig(), GEOM, tok, seed=0, token_pool="all").eval()
    assert model.config.vision_token_pool == "all"
    assert tokens_per_image(model, "T1") == 1 and tokens_per_image(model, "rsfMRI") == 1
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        feats = model.image_features({"T1": x}, [("T1", 0), ("T1", 1)])
        tokens = model.model.vision_tower(x, modality="T1", return_dict=True).hidden_states[-1]
        expected = model.model.multi_modal_projector(tokens.mean(dim=1, keepdim=True))
    assert [tuple(f.shape) for f in feats] == [(1, 128)] * 2
    assert torch.allclose(torch.stack(feats), expected, atol=1e-5)
    ids = _ids(enc, 1)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, _ = load_brain_llava(tmp_path)
    assert again.config.vision_token_pool == "all"
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values={"T1": x}, image_order=[("T1", 0), ("T1", 1)]).logits
        b = again(input_ids=ids, pixel_values={"T1": x}, image_order=[("T1", 0), ("T1", 1)]).logits
    assert torch.equal(a, b)
    with pytest.raises(ModelError, match="'all'"):
        build_brain_llava(ModelConfig(), GEOM, tok, token_pool="every")


def test_config_takes_all_or_a_positive_integer():
    from umbrella.config import load_config
    from umbrella.errors import ConfigError

    assert load_config(None, ["model.token_pool=all"]).model.token_pool == "all"
    assert load_config(None, ["model.token_pool=2"]).model.token_pool == 2
    for bad in ("0", "every"):
        with pytest.raises(ConfigError, match="positive integer"):
            load_config(None, [f"model.token_pool={bad}"])
