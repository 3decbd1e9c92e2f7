"""The connectivity embedding of rsfMRI (model.rsfmri_embed=connectivity): each patch a region,
its token a linear map of the region's row of the window's correlation matrix; geometry checks,
the config key, save/reload and a 2-rank DDP step with the other modalities idle or linear."""

import numpy as np
import pytest
import torch
from ddp_two_ranks import assert_step_agrees, two_rank_step

from umbrella.config import ModelConfig, load_config
from umbrella.errors import ConfigError
from umbrella.model.build import with_patch_embed
from umbrella.model.configuration_brain_vit import BrainViTConfig
from umbrella.model.modeling_brain_vit import BrainViTModel

GEOM = {"T1": {"image_size": [16, 16, 16], "patch_size": [8, 8, 8]},
        "rsfMRI": {"image_size": [16, 16, 8, 6], "patch_size": [8, 8, 4, 6]}}


def _tower(hidden: int = 16) -> BrainViTModel:
    mods = with_patch_embed(ModelConfig(rsfmri_embed="connectivity", center_inputs=False), GEOM)
    torch.manual_seed(0)
    return BrainViTModel(BrainViTConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_attention_heads=4, modalities=mods)).eval()


def test_connectivity_embedding_is_not_centred():
    """model.center_inputs centres linear / conv patches only: a correlation is unchanged by a
    global scale, and subtracting the population's mean series would only add its noise."""
    mods = with_patch_embed(ModelConfig(rsfmri_embed="connectivity", center_inputs=True), GEOM)
    assert mods["T1"].get("center") is True and "center" not in mods["rsfMRI"]
    tower = BrainViTModel(BrainViTConfig(hidden_size=16, intermediate_size=32,
                                         num_attention_heads=4, modalities=mods))
    assert tower.embeddings["T1"].center is not None
    assert tower.embeddings["rsfMRI"].center is None


def test_region_correlation_is_pearson_of_the_region_means():
    emb = _tower().embeddings["rsfMRI"]
    x = torch.randn(2, 1, 16, 16, 8, 6)
    x[1, 0, :8, :8, :4] = 3.0  # a flat region: correlates 0 with every region, itself included
    corr = emb.region_correlation(x)
    assert corr.shape == (2, 8, 8) and corr.dtype == torch.float32
    for b in range(2):
        means = x[b, 0].reshape(2, 8, 2, 8, 2, 4, 6).mean(dim=(1, 3, 5)).reshape(8, 6).numpy()
        expected = np.corrcoef(means[1:]) if b else np.corrcoef(means)
        got = corr[b].numpy() if not b else corr[b, 1:, 1:].numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert torch.all(corr[1, 0] == 0)


def test_tokens_are_the_correlation_rows_not_the_intensities():
    tower = _tower()
    emb = tower.embeddings["rsfMRI"]
    assert emb.connectivity.in_features == 8 and emb.proj is None
    assert tower.embeddings["T1"].connectivity is None
    x = torch.randn(1, 1, 16, 16, 8, 6)
    with torch.no_grad():
        tokens = emb(x)
        expected = emb.connectivity(emb.region_correlation(x)) + emb.position_embedding
        torch.testing.assert_close(tokens, expected)
        assert tokens.shape == (1, 8, 16)
        # each region's series scaled and shifted: correlations, hence tokens, unchanged
        gain = torch.rand(1, 1, 2, 1, 2, 1, 2, 1, 1) + 0.5
        scaled = (x.reshape(1, 1, 2, 8, 2, 8, 2, 4, 6) * gain + 3).reshape(x.shape)
        torch.testing.assert_close(emb(scaled), tokens, atol=1e-4, rtol=1e-4)
        # two regions made to share a series: their rows of the correlation change, so do the tokens
        y = x.clone()
        y[0, 0, 8:, 8:, 4:] = y[0, 0, :8, :8, :4]
        assert (emb.region_correlation(y)[0, 0, 7] - 1).abs() < 1e-5
        assert (emb(y)[0, 0] - tokens[0, 0]).abs().max() > 1e-3  # region 0's own voxels unchanged


def test_geometry_and_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"rsfMRI: embed=connectivity .*patch_size\[3\] = image_size\[3\]"):
        BrainViTConfig(modalities={"rsfMRI": {"image_size": [16, 16, 16, 6],
                                              "patch_size": [8, 8, 8, 3], "embed": "connectivity"}})
    with pytest.raises(ConfigError, match=r"model.rsfmri_embed=connectivity: rsfMRI: .*window"):
        with_patch_embed(ModelConfig(rsfmri_embed="connectivity"),
                         {"rsfMRI": {"image_size": [16, 16, 16, 6], "patch_size": [8, 8, 8, 3]}})
    with pytest.raises(ConfigError, match=r"model.patch_embed=connectivity: T1: .*4D"):
        with_patch_embed(ModelConfig(patch_embed="connectivity"), GEOM)
    with pytest.raises(ConfigError, match="rsfmri_embed.*choose one of auto, linear, conv, connectivity"):
        load_config(None, ["model.rsfmri_embed=graph"])
    cfg = load_config(None, ["model.rsfmri_embed=connectivity"]).model
    specs = with_patch_embed(cfg, GEOM)
    assert specs["rsfMRI"]["embed"] == "connectivity" and specs["T1"]["embed"] == "linear"
    assert with_patch_embed(load_config().model, GEOM)["rsfMRI"]["embed"] == "linear"  # auto


def test_save_and_reload_keep_the_connectivity_weights(tmp_path):
    tower = _tower()
    tower.save_pretrained(tmp_path)
    again = BrainViTModel.from_pretrained(tmp_path).eval()
    assert again.config.modalities["rsfMRI"]["embed"] == "connectivity"
    x = torch.randn(2, 1, 16, 16, 8, 6)
    with torch.no_grad():
        torch.testing.assert_close(again.embeddings["rsfMRI"](x), tower.embeddings["rsfMRI"](x))
    for (n, p), (n2, p2) in zip(tower.state_dict().items(), again.state_dict().items(), strict=True):
        assert n == n2 and torch.equal(p, p2), n


def test_two_rank_ddp_step_with_the_connectivity_embedding(tmp_path):
    """Rank 0 trains T1, rank 1 rsfMRI (connectivity), dMRI idle: the step completes, the
    connectivity weights get the single-process gradient on both ranks, idle dMRI untouched."""
    ranks, ref = two_rank_step(tmp_path, "--connectivity")
    # rsfMRI: position table, connectivity weight + bias (no patch projection)
    assert len(ref["grads"]["rsfMRI"]) == 3
    assert_step_agrees(ranks, ref)
