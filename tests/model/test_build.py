import pytest
import torch

from umbrella.config import ModelConfig
from umbrella.data.prompts import PromptEncoder
from umbrella.data.records import Turn
from umbrella.data.tokenizer import train_tokenizer
from umbrella.errors import ModelError
from umbrella.model.build import build_brain_llava, load_brain_llava

GEOM = {"T1": {"image_size": [32, 32, 32], "patch_size": [8, 8, 8]},
        "dMRI": {"image_size": [16, 16, 16], "patch_size": [8, 8, 8]}}


@pytest.fixture(scope="module")
def parts():
    tok = train_tokenizer(["What is the sex of this subject? male female"] * 4, 300)
    model = build_brain_llava(ModelConfig(), GEOM, tok, seed=0).eval()
    return model, tok, PromptEncoder(tok)


def _inputs(enc, tokens):
    e = enc.encode([Turn("user", "<image>\nWhat is the sex?"), Turn("assistant", "male")], [tokens])
    ids = torch.tensor([e.input_ids, e.input_ids])
    return ids, torch.tensor([e.labels, e.labels])


def test_one_embedding_per_modality_with_own_position_table(parts):
    model, _, _ = parts
    names = [n for n, _ in model.named_parameters()]
    for m, n_tok in (("T1", 64), ("dMRI", 8)):
        assert f"model.vision_tower.embeddings.{m}.proj.weight" in names
        pos = model.model.vision_tower.embeddings[m].position_embedding
        assert pos.shape == (1, n_tok, 64)
        assert 0.005 < pos.std().item() < 0.05  # initialised (trunc normal, std 0.02), not zeros
    assert model.config.vision_config.tokens_per_image("T1") == 64


def test_save_load_reproduces_logits_exactly(parts, tmp_path):
    model, tok, enc = parts
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    again, tok2 = load_brain_llava(tmp_path)
    ids, _ = _inputs(enc, 64)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values={"T1": x}, image_order=[("T1", 0), ("T1", 1)]).logits
        b = again(input_ids=ids, pixel_values={"T1": x}, image_order=[("T1", 0), ("T1", 1)]).logits
    assert torch.equal(a, b)
    assert tok2("male female").input_ids == tok("male female").input_ids


def test_images_routed_by_modality_in_order(parts):
    model, _, _ = parts
    t1, fa = torch.randn(1, 1, 32, 32, 32), torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        feats = model.image_features({"T1": t1, "dMRI": fa}, [("dMRI", 0), ("T1", 0)])
        alone = model.image_features({"T1": t1}, [("T1", 0)])
    assert [f.shape[0] for f in feats] == [8, 64]
    assert torch.allclose(feats[1], alone[0])


def test_token_feature_mismatch_raises_with_both_counts(parts):
    model, _, enc = parts
    ids, _ = _inputs(enc, 10)  # 10 placeholders, but a T1 image gives 64 features
    with pytest.raises(ModelError, match=r"20 image tokens but the 2 images give 128 features"):
        model(input_ids=ids, pixel_values={"T1": torch.randn(2, 1, 32, 32, 32)},
              image_order=[("T1", 0), ("T1", 1)])


def test_wrong_geometry_and_unknown_modality(parts):
    model, _, _ = parts
    with pytest.raises(ValueError, match="do not match"):
        model.image_features({"T1": torch.randn(1, 1, 16, 16, 16)}, [("T1", 0)])
    with pytest.raises(ValueError, match="no patch embedding"):
        model.image_features({"rsfMRI": torch.randn(1, 1, 16, 16, 16)}, [("rsfMRI", 0)])


def test_bad_geometry_and_base_rejected(parts):
    _, tok, _ = parts
    with pytest.raises(ValueError, match="not a multiple"):
        build_brain_llava(ModelConfig(), {"T1": {"image_size": [30, 32, 32],
                                                 "patch_size": [8, 8, 8]}}, tok)
    with pytest.raises(ModelError, match="not implemented yet"):
        build_brain_llava(ModelConfig(base="llava-hf/llava-1.5-7b-hf"), GEOM, tok)


def test_4d_patch_embedding_folds_time_blocks():
    from umbrella.model.modeling_brain_vit import BrainPatchEmbedding

    emb = BrainPatchEmbedding(8, {"in_channels": 1, "image_size": [8, 8, 8, 6],
                                  "patch_size": [4, 4, 4, 3]})
    x = torch.randn(2, 1, 8, 8, 8, 6)
    out = emb(x)
    assert out.shape == (2, 16, 8)  # 2 time blocks x 8 spatial patches
    # token 8 = time block 1 (frames 3..5), spatial patch 0
    patch = x[0, 0, :4, :4, :4, 3:6].permute(3, 0, 1, 2)
    manual = (emb.proj.weight * patch).sum(dim=(1, 2, 3, 4)) + emb.proj.bias
    assert torch.allclose(out[0, 8] - emb.position_embedding[0, 8], manual, atol=1e-5)
