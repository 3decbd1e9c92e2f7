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
    # the schema's own keys hold no secrets: a word under model.token_pool is kept too
    save_config(load_config(None, ["model.token_pool=all"]), tmp_path / "all.yaml")
    assert load_config(tmp_path / "all.yaml", []).model.token_pool == "all"


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


def test_recipe_lies_beneath_the_configs_own_keys(tmp_path):
    """recipe: t1_two_stage sets every key of umbrella.recipes.T1_TWO_STAGE that the file and
    the command line leave unset; their own keys win; the choice is saved and reloads."""
    from umbrella.config import config_to_dict
    from umbrella.recipes import T1_TWO_STAGE, dotlist

    plain = config_to_dict(load_config(None, []))
    want = config_to_dict(load_config(None, dotlist(T1_TWO_STAGE)))
    path = tmp_path / "mine.yaml"
    path.write_text("recipe: t1_two_stage\ndataset:\n  T1:\n    records: [r.jsonl]\n"
                    "training:\n  learning_rate: 1.0e-4\n")
    cfg = load_config(path, ["training.max_steps=300"])
    got = config_to_dict(cfg)
    assert cfg.recipe == "t1_two_stage"
    changed = 0
    for key in dotlist(T1_TWO_STAGE):
        section, *parts = key.split("=")[0].split(".")
        a, b, c = got[section], want[section], plain[section]
        for part in parts:
            a, b, c = a[part], b[part], c[part]
        if key.startswith(("training.learning_rate", "training.max_steps")):
            continue
        assert a == b, key
        changed += a != c
    assert changed >= 10  # the recipe is not the defaults
    assert cfg.training.learning_rate == 1.0e-4 and cfg.training.max_steps == 300
    assert cfg.dataset.T1.records == ["r.jsonl"]
    save_config(cfg, tmp_path / "saved.yaml")
    assert config_to_dict(load_config(tmp_path / "saved.yaml")) == got
    # recipe=none on the command line takes the file's recipe away
    assert load_config(path, ["recipe=none"]).model.patch_embed == plain["model"]["patch_embed"]


def test_recipe_is_checked():
    with pytest.raises(ConfigError, match=r"recipe='t1'; choose one of none, t1_two_stage"):
        load_config(None, ["recipe=t1"])
    with pytest.raises(ConfigError, match=r"trains T1 records alone.*dataset\.rsfMRI\.records"):
        load_config(None, ["recipe=t1_two_stage", "dataset.T1.records=[a.jsonl]",
                           "dataset.rsfMRI.records=[b.jsonl]"])


def test_pipeline_check_notice_names_the_recipe_for_a_cohort_on_the_defaults():
    from umbrella.data.records import parse_record
    from umbrella.training.run import PIPELINE_CHECK_SUBJECTS, pipeline_check_notice

    def records(n):
        return [parse_record({"id": f"s{i}_sex", "subject_id": f"s{i}", "split": "train",
                              "task": "sex", "images": [{"modality": "T1", "path": f"{i}.nii"}],
                              "conversations": [{"from": "human", "value": "<image> Sex?"},
                                                {"from": "gpt", "value": "female"}]})
                for i in range(n)]

    t1 = ["dataset.T1.records=[a.jsonl]"]
    cohort = records(PIPELINE_CHECK_SUBJECTS)
    note = pipeline_check_notice(load_config(None, t1), cohort)
    assert note.startswith("note: training.max_steps=150") and "recipe: t1_two_stage" in note
    assert f"{PIPELINE_CHECK_SUBJECTS} training subjects" in note
    assert pipeline_check_notice(load_config(None, t1), records(PIPELINE_CHECK_SUBJECTS - 1)) is None
    assert pipeline_check_notice(load_config(None, [*t1, "training.max_steps=2000"]), cohort) is None
    assert pipeline_check_notice(load_config(None, [*t1, "recipe=t1_two_stage"]), cohort) is None
    both = pipeline_check_notice(load_config(None, [*t1, "dataset.rsfMRI.records=[b.jsonl]"]),
                                 cohort)
    assert "recipe: t1_two_stage" not in both and "training.max_steps" in both
