"""model.embedding_cache_mb: a patch embedding whose output cannot change (frozen, or under
no_grad in evaluation) embeds each distinct input image once; anything else is computed as before."""

import pytest
import torch

from umbrella.config import ModelConfig, load_config
from umbrella.data.prompts import PromptEncoder
from umbrella.data.records import Turn
from umbrella.data.tokenizer import train_tokenizer
from umbrella.errors import ConfigError
from umbrella.model.build import build_brain_llava
from umbrella.model.configuration_brain_vit import BrainViTConfig
from umbrella.model.modeling_brain_vit import (
    BrainViTModel,
    OutputCache,
    enable_output_cache,
    output_cache_counts,
)
from umbrella.model.trainable import apply_trainable_policy

SPEC = {"image_size": [32, 32, 32], "patch_size": [8, 8, 8], "embed": "conv",
        "stem_channels": [8, 16, 32], "stem_style": "pooled"}


def _embedding():
    torch.manual_seed(0)
    tower = BrainViTModel(BrainViTConfig(hidden_size=32, intermediate_size=64,
                                         num_attention_heads=4, modalities={"T1": SPEC}))
    emb = tower.embeddings["T1"]
    emb.train()
    with torch.no_grad():  # running statistics that are not the initial 0 / 1
        emb(torch.randn(4, 1, 32, 32, 32))
    return tower, emb


def _plain(emb, x):
    cache, emb.output_cache = emb.output_cache, None
    try:
        with torch.no_grad():
            return emb(x)
    finally:
        emb.output_cache = cache


def test_a_frozen_embedding_embeds_each_distinct_image_once():
    tower, emb = _embedding()
    emb.frozen = True
    emb.requires_grad_(False)
    tower.train()  # the model around it trains: the frozen embedding stays in evaluation mode
    assert not emb.training
    assert enable_output_cache(tower, 16) == 1
    x = torch.randn(3, 1, 32, 32, 32)
    first = emb(x)
    assert output_cache_counts(tower) == {"hits": 0, "misses": 3, "entries": 3}
    assert torch.allclose(first, _plain(emb, x), atol=1e-6)
    # one image again, a flipped copy twice (a new input): two hits, one embedded
    batch = torch.cat([x[1:2], x[0:1].flip(-1), x[0:1].flip(-1)])
    second = emb(batch)
    assert output_cache_counts(tower) == {"hits": 2, "misses": 4, "entries": 4}
    assert torch.equal(second[0], first[1]) and torch.equal(second[1], second[2])
    assert torch.allclose(second, _plain(emb, batch), atol=1e-6)
    assert not second.requires_grad


def test_a_connectivity_embedding_is_cached_at_evaluation():
    spec = {"image_size": [16, 16, 16, 6], "patch_size": [8, 8, 8, 6], "embed": "connectivity"}
    torch.manual_seed(0)
    tower = BrainViTModel(BrainViTConfig(hidden_size=32, intermediate_size=64,
                                         num_attention_heads=4, modalities={"rsfMRI": spec})).eval()
    enable_output_cache(tower, 16)
    x = torch.randn(2, 1, 16, 16, 16, 6)
    with torch.no_grad():
        first, second = tower.embeddings["rsfMRI"](x), tower.embeddings["rsfMRI"](x)
    assert torch.equal(first, second)
    assert output_cache_counts(tower) == {"hits": 2, "misses": 2, "entries": 2}


def test_an_embedding_that_trains_is_never_served_from_the_cache():
    tower, emb = _embedding()
    enable_output_cache(tower, 16)
    x = torch.randn(2, 1, 32, 32, 32)
    tower.train()
    out = emb(x)  # training mode: batch statistics, gradients to the weights
    assert out.requires_grad
    tower.eval()
    emb(x)  # evaluation mode with gradients to the weights: not cacheable either
    assert output_cache_counts(tower) == {"hits": 0, "misses": 0, "entries": 0}
    with torch.no_grad():
        emb(x)
        emb(x)
    assert output_cache_counts(tower) == {"hits": 2, "misses": 2, "entries": 2}
    tower.train()
    emb(x).sum().backward()  # a training step: new batch statistics
    tower.eval()
    with torch.no_grad():
        again = emb(x)
    assert output_cache_counts(tower) == {"hits": 2, "misses": 4, "entries": 2}
    assert torch.allclose(again, _plain(emb, x), atol=1e-6)


@pytest.mark.parametrize("change", ["load_state_dict", "fused_adamw"])
def test_the_cache_forgets_when_the_weights_change(change):
    tower, emb = _embedding()
    emb.eval()
    enable_output_cache(tower, 16)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        before = emb(x)
    if change == "load_state_dict":
        state = {k: v + 0.1 if v.is_floating_point() else v for k, v in emb.state_dict().items()}
        emb.load_state_dict(state)
    else:  # the Trainer's optimiser on CPU: it updates weights without bumping their versions
        opt = torch.optim.AdamW(emb.parameters(), lr=0.1, fused=True)
        versions = [p._version for p in emb.parameters()]
        emb(x).square().mean().backward()  # evaluation mode, gradients on: computed, not kept
        opt.step()
        assert [p._version for p in emb.parameters()] == versions
    with torch.no_grad():
        after = emb(x)
    assert output_cache_counts(tower)["hits"] == 0
    assert not torch.allclose(before, after)
    assert torch.allclose(after, _plain(emb, x), atol=1e-6)


def test_the_budget_is_shared_by_the_modalities():
    modalities = {"T1": SPEC, "dMRI": {**SPEC, "embed": "linear"}}
    tower = BrainViTModel(BrainViTConfig(hidden_size=32, intermediate_size=64,
                                         num_attention_heads=4, modalities=modalities))
    assert enable_output_cache(tower, 8) == 2
    assert [e.output_cache.max_bytes for e in tower.embeddings.values()] == [4 * 2**20] * 2
    assert enable_output_cache(tower, 0) == 0
    assert all(e.output_cache is None for e in tower.embeddings.values())


def test_entries_beyond_the_budget_go_least_recently_used_first():
    cache = OutputCache(max_bytes=3 * 4 * 10)  # three float32 rows of 10
    rows = {k: torch.full((10,), float(i)) for i, k in enumerate([b"a", b"b", b"c", b"d"])}
    for key in (b"a", b"b", b"c"):
        cache.put(key, rows[key])
    assert cache.get(b"a") is not None  # "a" now the most recently used
    cache.put(b"d", rows[b"d"])
    assert [*cache.entries] == [b"c", b"a", b"d"] and cache.bytes == 120
    cache.put(b"d", rows[b"d"])  # the same key again: counted once
    assert [*cache.entries] == [b"c", b"a", b"d"] and cache.bytes == 120
    cache.put(b"big", torch.zeros(100))  # larger than the budget: not kept
    assert b"big" not in cache.entries
    assert OutputCache.key(torch.zeros(2, 3), "x") != OutputCache.key(torch.zeros(3, 2), "x")
    assert OutputCache.key(torch.zeros(4), "x") != OutputCache.key(torch.zeros(4), "y")


def test_a_vlm_over_a_frozen_tower_gives_the_same_loss_and_gradients_with_the_cache():
    tok = train_tokenizer(["What is the sex of this subject? male female"] * 4, 300)
    enc = PromptEncoder(tok)
    e = enc.encode([Turn("user", "<image>\nWhat is the sex?"), Turn("assistant", "male")], [64])
    ids, labels = torch.tensor([e.input_ids] * 2), torch.tensor([e.labels] * 2)
    pixels = {"T1": torch.randn(2, 1, 32, 32, 32)}
    order = [("T1", 0), ("T1", 1)]
    cfg = ModelConfig(patch_embed="conv", stem_channels=[8, 16, 32], stem_style="pooled")
    results = []
    for megabytes in (0, 16):
        model = build_brain_llava(cfg, {"T1": SPEC}, tok, seed=0)
        apply_trainable_policy(model, embeddings="frozen", vision="frozen")
        enable_output_cache(model, megabytes)
        model.train()
        for _ in range(2):  # the second step reads the tower's inputs from the cache
            model.zero_grad()
            loss = model(input_ids=ids, pixel_values=pixels, image_order=order, labels=labels).loss
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, output_cache_counts(model)))
    (loss0, grads0, counts0), (loss1, grads1, counts1) = results
    assert counts0 == {"hits": 0, "misses": 0, "entries": 0}
    assert counts1 == {"hits": 2, "misses": 2, "entries": 2}
    assert torch.allclose(loss0, loss1, atol=1e-6)
    assert grads0.keys() == grads1.keys() and grads0
    assert not [n for n in grads0 if "vision_tower" in n]
    for name, g in grads0.items():
        assert torch.allclose(g, grads1[name], atol=1e-6, rtol=1e-5), name


def test_config_key_is_bounded():
    assert load_config(None, []).model.embedding_cache_mb == 1024
    with pytest.raises(ConfigError, match=r"model.embedding_cache_mb.*must be >= 0"):
        load_config(None, ["model.embedding_cache_mb=-1"])
