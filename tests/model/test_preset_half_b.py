"""The 0.5B-class preset: Qwen2-0.5B's LM shape and a SigLIP-base-sized tower, random init.

The shape is checked on the meta device (no memory, a second); one real CPU training step of the
full-size model (gradient checkpointing, SDPA, batch 1, 8 image tokens) is marked slow: building
584 M random weights alone takes 30-90 s on 2 cores.
"""

import math

import pytest
import torch

from umbrella.config import ModelConfig
from umbrella.data.prompts import PromptEncoder
from umbrella.data.records import Turn
from umbrella.data.tokenizer import train_tokenizer
from umbrella.model.build import PRESETS, build_brain_llava

# Qwen2-0.5B's config.json: hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151936,
# tied embeddings, rope_theta 1e6; its parameter count (tied) is 494,032,768
QWEN2_HALF_B_PARAMS = 494_032_768
GEOM = {"T1": {"image_size": [32, 32, 32], "patch_size": [16, 16, 16]}}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["What is the sex of this subject? male female"] * 4, 300)


def _build(tokenizer, **kw):
    return build_brain_llava(ModelConfig(preset="0.5b"), GEOM, tokenizer, **kw)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_preset_has_qwen2_half_b_and_siglip_base_shapes(tokenizer):
    with torch.device("meta"):
        model = _build(tokenizer)
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads, text.intermediate_size, text.vocab_size) == \
        (896, 24, 14, 2, 4864, 151936)
    assert text.rope_parameters["rope_theta"] == 1_000_000.0
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads,
            vision.intermediate_size) == (768, 12, 12, 3072)
    lm = model.model.language_model
    assert model.lm_head.weight is lm.embed_tokens.weight  # tied, as in Qwen2-0.5B
    assert _count(lm) == QWEN2_HALF_B_PARAMS
    # tower: 12 SigLIP-base layers (7,087,872 each) + the T1 patch embedding (16³ -> 768, 8 tokens)
    layer = 4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768 + 4 * 768
    embed = 16 ** 3 * 768 + 768 + 8 * 768
    assert _count(model.model.vision_tower) == 12 * layer + embed
    assert math.isclose(_count(model) / 1e6, 584, abs_tol=5)
    assert model.config._attn_implementation == "sdpa"


def test_tokenizer_larger_than_preset_vocab_is_never_cut(tokenizer):
    class Big:  # only what build_brain_llava reads from a tokenizer
        pad_token_id, eos_token_id = 0, 1

        def __len__(self):
            return 160_000

        def convert_tokens_to_ids(self, token):
            return 2

    with torch.device("meta"):
        model = _build(Big())
    assert model.config.text_config.vocab_size == 160_000


def test_small_and_tiny_presets_unchanged(tokenizer):
    assert PRESETS["tiny"]().text_intermediate_size is None
    with torch.device("meta"):
        model = build_brain_llava(ModelConfig(), GEOM, tokenizer)
    assert model.config.text_config.intermediate_size == 4 * 128
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight


@pytest.mark.slow
def test_one_training_step_of_the_full_size_model_on_cpu(tokenizer):
    torch.manual_seed(0)
    model = _build(tokenizer, seed=0).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.vision_tower.gradient_checkpointing
    enc = PromptEncoder(tokenizer)
    e = enc.encode([Turn("user", "<image>\nWhat is the sex?"), Turn("assistant", "male")], [8])
    batch = {"input_ids": torch.tensor([e.input_ids]), "labels": torch.tensor([e.labels]),
             "pixel_values": {"T1": torch.randn(1, 1, 32, 32, 32)}, "image_order": [("T1", 0)]}
    loss = model(**batch).loss
    # random init over 151,936 outputs: the loss starts near ln(vocab)
    assert abs(loss.item() - math.log(151936)) < 1.5
    loss.backward()
    parts = {"tower": model.model.vision_tower.layers, "projector": model.model.multi_modal_projector,
             "lm": model.model.language_model.layers}
    for name, part in parts.items():
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads, f"no gradient reached the {name}"
        assert all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
    before = model.lm_head.weight.detach()[:4].clone()
    with torch.no_grad():  # plain SGD: AdamW's two moments would add 4.7 GB on this machine
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-1e-2)
    assert not torch.equal(before, model.lm_head.weight[:4])
    assert model(**batch).loss.item() < loss.item()  # the step lowered the loss of its batch
