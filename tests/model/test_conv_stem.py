"""The convolutional patch embedding (model.patch_embed=conv): same token grid as the linear
patches, saved and reloaded with the model, initialised as the field does, covered under DDP."""

import json
import math

import pytest
import torch
from ddp_two_ranks import assert_step_agrees, two_rank_step
from transformers import Trainer

from umbrella.config import ModelConfig, load_config
from umbrella.data.prompts import PromptEncoder
from umbrella.data.records import Turn
from umbrella.data.tokenizer import train_tokenizer
from umbrella.errors import ConfigError
from umbrella.geometry import stem_plan
from umbrella.model.build import build_brain_llava, load_brain_llava, with_patch_embed
from umbrella.model.configuration_brain_vit import BrainViTConfig
from umbrella.model.modeling_brain_vit import BrainPatchEmbedding, BrainViTModel
from umbrella.training.trainer import modality_parameters

GEOM = {"T1": {"image_size": [32, 32, 32], "patch_size": [8, 8, 8]},
        "rsfMRI": {"image_size": [16, 16, 16, 6], "patch_size": [8, 8, 8, 3]}}
CONV = ModelConfig(patch_embed="conv", stem_channels=[8, 16, 32])
POOLED = ModelConfig(patch_embed="conv", stem_channels=[8, 16, 32], stem_style="pooled")


def _tower(embed: str, modalities: dict, hidden: int = 32, style: str = "strided") -> BrainViTModel:
    stem = {"stem_channels": [8, 16, 32, 32], "stem_style": style} if embed == "conv" else {}
    mods = {m: {**s, "embed": embed, **stem} for m, s in modalities.items()}
    torch.manual_seed(0)
    return BrainViTModel(BrainViTConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_attention_heads=4, modalities=mods)).eval()


@pytest.mark.parametrize("style", ["strided", "pooled"])
@pytest.mark.parametrize("modality,shape", [("T1", (2, 1, 32, 32, 32)), ("rsfMRI", (2, 1, 16, 16, 16, 6))])
def test_conv_stem_gives_the_linear_token_grid(modality, shape, style):
    linear, conv = _tower("linear", GEOM), _tower("conv", GEOM, style=style)
    x = torch.randn(shape)
    with torch.no_grad():
        a = linear.embeddings[modality](x)
        b = conv.embeddings[modality](x)
    assert a.shape == b.shape == (2, conv.config.tokens_per_image(modality), 32)
    assert b.shape[1] == {"T1": 64, "rsfMRI": 2 * 8}[modality]
    stem = conv.embeddings[modality].stem
    assert len(stem) == 3  # patch 8 = three stride-2 stages, then a 1x1x1 projection
    assert conv.embeddings[modality].proj.kernel_size == (1, 1, 1)
    # rsfMRI: the 3 frames of a time block are the first stage's input channels
    assert stem[0].conv.in_channels == {"T1": 1, "rsfMRI": 3}[modality]


def test_conv_tokens_see_beyond_their_patch_linear_tokens_do_not():
    linear, conv = _tower("linear", GEOM), _tower("conv", GEOM)
    x = torch.randn(1, 1, 32, 32, 32)
    y = x.clone()
    y[0, 0, 7, 7, 7] += 10.0  # last voxel of patch (0, 0, 0), next to patch (1, 1, 1)
    neighbour = 1 * 16 + 1 * 4 + 1  # token index of patch (1, 1, 1) in a 4x4x4 grid
    far = 3 * 16 + 3 * 4 + 3
    with torch.no_grad():
        lin = linear.embeddings["T1"](y) - linear.embeddings["T1"](x)
        cnv = conv.embeddings["T1"](y) - conv.embeddings["T1"](x)
    assert lin[0, 0].abs().max() > 0 and lin[0, neighbour].abs().max() == 0
    # overlapping receptive fields reach the neighbour; the far token (outside the 15-voxel
    # receptive field) moves only through the GroupNorm statistics, far less
    assert cnv[0, neighbour].abs().max() > 10 * cnv[0, far].abs().max() > 0


def test_stem_uses_no_batch_statistics():
    conv = _tower("conv", GEOM)
    x = torch.randn(3, 1, 32, 32, 32)
    with torch.no_grad():
        together = conv.embeddings["T1"](x)
        alone = torch.cat([conv.embeddings["T1"](x[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)
    norms = [m for m in conv.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert not norms and isinstance(conv.embeddings["T1"].stem[0].norm, torch.nn.GroupNorm)


def test_pooled_stem_normalises_by_batch_then_by_its_running_statistics():
    """stem_style=pooled: Conv3d stride 1 + BatchNorm + ReLU + max-pool per stage. In training a
    sample's tokens depend on the batch; at evaluation they do not, and a global intensity
    offset of one scan (which GroupNorm removes) still reaches its tokens."""
    pooled, strided = _tower("conv", GEOM, style="pooled"), _tower("conv", GEOM)
    stem = pooled.embeddings["T1"].stem
    assert all(isinstance(st.norm, torch.nn.BatchNorm3d) and st.conv.stride == (1, 1, 1)
               and isinstance(st.act, torch.nn.ReLU) and st.pool.kernel_size == (2, 2, 2)
               for st in stem)
    x = torch.randn(4, 1, 32, 32, 32)
    emb = pooled.embeddings["T1"].train()
    with torch.no_grad():
        for _ in range(20):  # running statistics of this population
            emb(torch.randn(4, 1, 32, 32, 32))
        together, first = emb(x), emb(x[:1])
    assert not torch.allclose(together[:1], first, atol=1e-4)  # batch statistics
    assert stem[0].norm.num_batches_tracked.item() == 22
    emb.eval()
    with torch.no_grad():
        together, first = emb(x), emb(x[:1])
        assert torch.allclose(together[:1], first, atol=1e-5)  # running statistics
        bright = x[:1] * 1.1 + 0.5  # the same scan, another contrast
        first_stage = {"pooled": stem[0], "strided": strided.embeddings["T1"].stem[0]}
        moved = {k: (st(bright) - st(x[:1]))[..., 1:, 1:, 1:].abs().mean()  # away from the padding
                 for k, st in first_stage.items()}
        assert (emb(bright) - first).abs().max() > 0.1
    # GroupNorm's per-image standardisation cancels a global a*x + b in its first stage (up to
    # the zero padding's edge); the population's statistics keep it
    assert moved["pooled"] > 10 * moved["strided"], moved


@pytest.mark.parametrize("patch,strides,rest", [
    ([16, 16, 16], [(2, 2, 2)] * 4, (1, 1, 1)),
    ([16, 16, 12], [(2, 2, 2), (2, 2, 2), (2, 2, 1), (2, 2, 1)], (1, 1, 3)),
    ([10, 10, 10], [(2, 2, 2)], (5, 5, 5)),
])
def test_stem_plan_splits_any_even_patch(patch, strides, rest):
    spec = {"patch_size": patch, "stem_channels": [16, 32, 64, 128]}
    assert stem_plan("T1", spec) == (strides, rest)
    size = [p * 2 for p in patch]
    tower = _tower("conv", {"T1": {"image_size": size, "patch_size": patch}}, hidden=32)
    with torch.no_grad():
        out = tower.embeddings["T1"](torch.randn(1, 1, *size))
    assert out.shape == (1, 8, 32)


def test_unbuildable_stems_raise_naming_modality_and_fix():
    with pytest.raises(ValueError, match=r"T1: patch_size \[5, 5, 5\] has no even.*patch_embed=linear"):
        BrainViTConfig(modalities={"T1": {"image_size": [10, 10, 10], "patch_size": [5, 5, 5],
                                          "embed": "conv"}})
    with pytest.raises(ValueError, match=r"rsfMRI: .*needs 4 stride-2 stem stages.*gives 2"):
        BrainViTConfig(modalities={"rsfMRI": {"image_size": [32, 32, 32, 4], "patch_size": [16, 16, 16, 4],
                                              "embed": "conv", "stem_channels": [8, 16]}})
    with pytest.raises(ValueError, match="embed='patchy'"):
        BrainViTConfig(modalities={"T1": {"image_size": [16] * 3, "patch_size": [8] * 3,
                                          "embed": "patchy"}})
    with pytest.raises(ConfigError, match="model.patch_embed=conv: T1: .*model.stem_channels"):
        with_patch_embed(ModelConfig(patch_embed="conv", stem_channels=[8]), GEOM)


def test_config_key_and_its_choices(tmp_path):
    cfg = load_config(None, ["model.patch_embed=conv", "model.stem_channels=[8,16,32]"])
    assert cfg.model.patch_embed == "conv" and cfg.model.stem_channels == [8, 16, 32]
    assert load_config().model.patch_embed == "linear"
    with pytest.raises(ConfigError, match="patch_embed.*choose one of linear, conv"):
        load_config(None, ["model.patch_embed=resnet"])
    assert load_config().model.stem_style == "strided"
    with pytest.raises(ConfigError, match="stem_style.*choose one of strided, pooled"):
        load_config(None, ["model.stem_style=resnet"])
    with pytest.raises(ValueError, match="T1: stem_style='max' is not a stem.*model.stem_style"):
        BrainViTConfig(modalities={"T1": {"image_size": [16] * 3, "patch_size": [8] * 3,
                                          "embed": "conv", "stem_style": "max"}})
    assert with_patch_embed(POOLED, GEOM)["rsfMRI"]["stem_style"] == "pooled"
    specs = with_patch_embed(CONV, GEOM)
    assert specs["T1"]["embed"] == "conv" and specs["T1"]["stem_channels"] == [8, 16, 32]
    assert with_patch_embed(ModelConfig(), GEOM)["T1"]["embed"] == "linear"


def test_initialisation_follows_kaiming_fan_out_and_unit_norms():
    torch.manual_seed(0)
    tok = train_tokenizer(["What is the sex? male female"] * 4, 280)
    spec = {"T1": {"image_size": [64, 64, 64], "patch_size": [16, 16, 16]}}
    model = build_brain_llava(ModelConfig(patch_embed="conv"), spec, tok, seed=0)
    emb = model.model.vision_tower.embeddings["T1"]
    convs = [stage.conv for stage in emb.stem] + [emb.proj]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128, 64]
    for conv in convs:
        fan_out = conv.out_channels * math.prod(conv.kernel_size)
        expected = math.sqrt(2.0 / fan_out)  # Kaiming normal, fan_out, ReLU gain
        assert abs(conv.weight.std().item() / expected - 1) < 0.1, (conv, conv.weight.std(), expected)
        assert abs(conv.weight.mean().item()) < 0.2 * expected
    assert all(stage.conv.bias is None for stage in emb.stem)  # a norm follows: no bias
    assert torch.equal(emb.proj.bias, torch.zeros_like(emb.proj.bias))
    for stage in emb.stem:
        assert torch.equal(stage.norm.weight, torch.ones_like(stage.norm.weight))
        assert torch.equal(stage.norm.bias, torch.zeros_like(stage.norm.bias))
    assert 0.015 < emb.position_embedding.std().item() < 0.025
    assert emb.position_embedding.abs().max().item() <= 2.0  # truncated normal
    # the linear path keeps its own initialisation (normal, std 0.02)
    lin = build_brain_llava(ModelConfig(), spec, tok, seed=0).model.vision_tower.embeddings["T1"]
    assert lin.stem is None and 0.015 < lin.proj.weight.std().item() < 0.025


def test_stem_parameters_belong_to_the_modality():
    tok = train_tokenizer(["What is the sex? male female"] * 4, 280)
    model = build_brain_llava(CONV, GEOM, tok, seed=0)
    groups = modality_parameters(model)
    stem_names = [n for n, _ in model.named_parameters() if ".stem." in n]
    assert stem_names and all(".embeddings.T1.stem." in n or ".embeddings.rsfMRI.stem." in n
                              for n in stem_names)
    emb = model.model.vision_tower.embeddings
    for m in ("T1", "rsfMRI"):
        assert {id(p) for p in emb[m].parameters()} == {id(p) for p in groups[m]}
    # the Trainer's AdamW decays the conv weights but not the norms and biases, as the field does
    decayed = set(Trainer.get_decay_parameter_names(None, model))
    assert "model.vision_tower.embeddings.T1.stem.0.conv.weight" in decayed
    assert not [n for n in stem_names if (".norm." in n) and n in decayed]


@pytest.mark.parametrize("cfg", [CONV, POOLED], ids=["strided", "pooled"])
def test_save_and_from_pretrained_reproduce_logits_exactly(tmp_path, cfg):
    tok = train_tokenizer(["What is the sex of this subject? male female"] * 4, 300)
    model = build_brain_llava(cfg, GEOM, tok, seed=0)
    enc = PromptEncoder(tok)
    e = enc.encode([Turn("user", "<image>\n<image>\nWhat is the sex?"), Turn("assistant", "male")],
                   [64, 16])
    ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
    pixels = {"T1": torch.randn(1, 1, 32, 32, 32), "rsfMRI": torch.randn(1, 1, 16, 16, 16, 6)}
    order = [("T1", 0), ("rsfMRI", 0)]
    model.train()  # one step, so the saved weights are not the initial ones
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=ids, pixel_values=pixels, image_order=order, labels=labels).loss.backward()
    opt.step()
    model.eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["vision_config"]["modalities"]
    assert saved["T1"]["embed"] == "conv" and saved["T1"]["stem_channels"] == [8, 16, 32]
    assert saved["T1"]["stem_style"] == cfg.stem_style
    if cfg.stem_style == "pooled":  # the training step's running statistics travel with it
        norm = model.model.vision_tower.embeddings["T1"].stem[0].norm
        assert norm.num_batches_tracked.item() == 1 and not torch.equal(
            norm.running_var, torch.ones_like(norm.running_var))
    again, _ = load_brain_llava(tmp_path)  # no trust_remote_code
    assert isinstance(again.model.vision_tower.embeddings["rsfMRI"], BrainPatchEmbedding)
    assert again.model.vision_tower.embeddings["rsfMRI"].stem is not None
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels, image_order=order).logits
        b = again(input_ids=ids, pixel_values=pixels, image_order=order).logits
    assert torch.equal(a, b)
    for (n, p), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert n == n2 and torch.equal(p, p2), n


def test_two_rank_ddp_step_with_conv_stems_on_different_modalities(tmp_path):
    """Rank 0 trains T1, rank 1 rsfMRI, dMRI idle on both: no 'Expected to have finished
    reduction', gradients agree with one process over the whole batch, idle stems untouched."""
    ranks, ref = two_rank_step(tmp_path, "--conv")
    assert len(ref["grads"]["T1"]) == 3 + 3 * 3  # position table, proj weight + bias, 3 stages
    assert_step_agrees(ranks, ref)
    for r in (*ranks, ref):
        assert any(".dMRI.stem." in n for n in r["dmri_before"])


def _load_worker():
    """The DDP worker module (tests/training/ddp_worker.py), to build what it trains."""
    import importlib.util

    from ddp_two_ranks import WORKER

    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_rank_ddp_step_with_pooled_stems(tmp_path):
    """The BatchNorm stages under DDP: each rank normalises its own batch (as the single process
    does each half), the idle modality's stem stays untouched."""
    ranks, ref = two_rank_step(tmp_path, "--conv", "--pooled")
    assert len(ref["grads"]["T1"]) == 3 + 3 * 3  # position table, proj weight + bias, 3 stages
    assert_step_agrees(ranks, ref)
    worker = _load_worker()
    model, _ = worker.setup(conv=True, pooled=True)
    stems = [e.stem for e in model.model.vision_tower.embeddings.values()]
    assert all(isinstance(stage.norm, torch.nn.BatchNorm3d) for stem in stems for stage in stem)


def test_training_run_with_the_conv_stem_saves_it(tiny_config):
    from umbrella.training.run import train

    cfg = tiny_config("training.max_steps=4", "training.logging_steps=2", "model.patch_embed=conv",
                      "model.stem_channels=[8,16,32]")
    result = train(cfg, progress=False)
    hist = json.loads((result.run_dir / "log_history.json").read_text())
    assert all(math.isfinite(h["loss"]) for h in hist if "loss" in h)
    model, _ = load_brain_llava(result.model_dir)
    spec = model.config.vision_config.modalities["T1"]
    assert spec["embed"] == "conv" and spec["stem_channels"] == [8, 16, 32]
    assert len(model.model.vision_tower.embeddings["T1"].stem) == 3  # patch 8
    assert "patch_embed: conv" in (result.run_dir / "config.yaml").read_text()
