from pathlib import Path

import pytest

from umbrella.config import load_config, save_config
from umbrella.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides():
    cfg = load_config(None, ["training.max_steps=20", "dataset.T1.records=[a.jsonl]",
                             "dataset.T1.image_size=[64,64,64]"])
    assert cfg.training.max_steps == 20
    assert cfg.dataset.T1.image_size == [64, 64, 64]
    assert list(cfg.dataset.enabled()) == ["T1"]  # empty rsfMRI/dMRI sections are skipped


def test_unknown_keys_named_with_nearest_valid_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset:\n  T1:\n    imge_size: [32, 32, 32]\ntraining:\n  max_step: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    text = str(err.value)
    assert "dataset.T1.imge_size" in text and "dataset.T1.image_size" in text
    assert "training.max_step'" in text and "training.max_steps" in text
    assert str(bad) in text
    assert len(err.value.problems) == 2  # all problems reported together


def test_mistyped_value_and_bad_choice():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["training.learning_rate=fast", "training.lr_scheduler=warm"])
    text = str(err.value)
    assert "training.learning_rate" in text and "'fast'" in text
    assert "training.lr_scheduler" in text and "cosine" in text


def test_override_must_be_key_value():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["training.max_steps"])


def test_value_given_a_section():
    with pytest.raises(ConfigError, match="takes a value"):
        load_config(None, ["training.seed.x=1"])


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(None, ["model.vision_layers=3", "dataset.T1.records=[r.jsonl]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    load_config(path)


def test_saved_config_redacts_secret_looking_values(tmp_path):
    from umbrella.config import REDACTED

    cfg = load_config(None, ["studies.MYSTUDY.tr=0.8", "studies.MYSTUDY.api_key=abc123",
                             "studies.MYSTUDY.hf-token=hf_xyz", "studies.MYSTUDY.monkey=banana",
                             "model.token_pool=2"])
    save_config(cfg, tmp_path / "c.yaml")
    text = (tmp_path / "c.yaml").read_text()
    assert "abc123" not in text and "hf_xyz" not in text
    saved = load_config(tmp_path / "c.yaml", [])
    assert saved.studies["MYSTUDY"] == {"tr": 0.8, "api_key": REDACTED, "hf-token": REDACTED,
                                        "monkey": "banana"}
    assert saved.model.token_pool == 2  # a number under a "token" key is not a secret


def test_augment_ranges_reach_the_training_augmentation():
    import numpy as np

    from umbrella.training.run import augmenter

    cfg = load_config(None, ["dataset.T1.augment=true", "dataset.T1.augment_ranges.flip_prob=1",
                             "dataset.T1.augment_ranges.rotate_deg=0",
                             "dataset.T1.augment_ranges.scale=0",
                             "dataset.T1.augment_ranges.translate_vox=0",
                             "dataset.T1.augment_ranges.intensity=0"])
    aug = augmenter("T1", cfg.dataset.T1)
    vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    np.testing.assert_array_equal(aug(vol, seed=3), vol[::-1])  # a left-right flip, nothing else
    # the defaults are the measured setting: flips, +-5 deg, +-4 voxels, no scaling / intensity
    default = augmenter("T1", load_config().dataset.T1).options
    assert {k: default[k] for k in ("flip_prob", "rotate_deg", "scale", "translate_vox",
                                    "intensity", "gamma")} == {
        "flip_prob": 0.5, "rotate_deg": 5.0, "scale": 0.0, "translate_vox": 4.0,
        "intensity": 0.0, "gamma": 0.0}
    with pytest.raises(ConfigError, match="augment_ranges.scale"):
        load_config(None, ["dataset.T1.augment_ranges.scale=wide"])
    with pytest.raises(ConfigError, match=r"dataset\.T1\.augment_ranges: .*scale < 1"):
        augmenter("T1", load_config(None, ["dataset.T1.augment_ranges.scale=1.5"]).dataset.T1)
    with pytest.raises(ConfigError, match="rsfMRI.augment=false"):
        augmenter("rsfMRI", load_config(None, ["dataset.rsfMRI.augment=true"]).dataset.rsfMRI)
