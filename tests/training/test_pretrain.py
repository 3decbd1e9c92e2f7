"""`umbrella pretrain`: the vision tower trained alone on the training split's answers, loaded into
the VLM with model.vision_init, kept as trained with model.train_embeddings=frozen."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tests.conftest import TINY

from umbrella.config import load_config
from umbrella.errors import ConfigError, RecordError


@pytest.fixture(scope="module")
def task_records(tiny_cohort, tmp_path_factory):
    """Sex and age records of the tiny cohort (one image answers both), and a copy whose test
    records point at files that do not exist."""
    from umbrella.demo.run import write_records

    out = tmp_path_factory.mktemp("task_records")
    files = write_records(tiny_cohort, out)["T1"]
    broken = []
    for f in files:
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        for r in rows:
            if r["split"] == "test":
                r["images"][0]["path"] = "missing/never_read.nii.gz"
        path = out / f"testless_{f.name}"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        broken.append(path)
    return {"files": files, "broken": broken}


def _config(tiny_cohort, records, out, *overrides):
    s, p = TINY["size"], TINY["patch"]
    return load_config(None, [
        f"dataset.T1.records=[{','.join(map(str, records))}]",
        f"dataset.T1.data_root={tiny_cohort.root}", f"dataset.T1.image_size=[{s},{s},{s}]",
        f"dataset.T1.patch_size=[{p},{p},{p}]", f"training.output_dir={out}",
        "dataset.memoize=true", "model.vocab_size=300", "model.patch_embed=conv",
        "model.stem_style=pooled", "model.stem_channels=[4,8,16]", "pretrain.epochs=2",
        "pretrain.batch_size=4", "training.max_steps=4", "training.batch_size=4",
        "training.warmup_steps=1", "training.eval_steps=0", *overrides])


@pytest.fixture(scope="module")
def pretrained(tiny_cohort, task_records, tmp_path_factory):
    """A tower pretrained on records whose test images do not exist (so none was read)."""
    from umbrella.training.pretrain import pretrain

    out = tmp_path_factory.mktemp("pretrain")
    cfg = _config(tiny_cohort, task_records["broken"], out / "runs",
                  f"pretrain.output_dir={out / 'tower'}")
    lines = []
    folder = pretrain(cfg, progress=False, log=lines.append)
    return {"folder": folder, "cfg": cfg, "log": lines, "out": out}


def test_items_merge_the_answers_of_one_image_and_refuse_two_answers(task_records):
    from umbrella.data.records import load_records
    from umbrella.training.pretrain import collect_items, make_heads

    records = [r for f in task_records["files"] for r in load_records(f)]
    train = [r for r in records if r.split == "train"]
    items, unused = collect_items(train)
    assert len(items) == len({r.subject_id for r in train})  # sex + age of one image: one item
    assert all(set(it.targets) == {"sex", "age"} for it in items)
    assert not unused
    heads = {h.task: h for h in make_heads(items)}
    ages = [it.targets["age"] for it in items]
    assert heads["age"].kind == "regression" and heads["age"].mean == pytest.approx(
        sum(ages) / len(ages))
    assert heads["sex"].kind == "classification" and set(heads["sex"].options) >= {"male", "female"}

    sex = next(r for r in train if r.task == "sex")
    other = "female" if sex.answer.strip().lower() == "male" else "male"
    turns = tuple(dataclasses.replace(t, text=other) if t.role == "assistant" else t
                  for t in sex.turns)
    clash = dataclasses.replace(sex, id=sex.id + "_again", turns=turns)
    with pytest.raises(RecordError, match="answers sex with"):
        collect_items(train + [clash])


def test_pretrain_writes_the_tower_its_description_and_keeps_the_best_epoch(pretrained):
    from umbrella.training.pretrain import INFO_FILE, TOWER_FILE

    folder = pretrained["folder"]
    info = json.loads((folder / INFO_FILE).read_text())
    assert (folder / TOWER_FILE).is_file() and (folder / "config.yaml").is_file()
    assert {h["task"] for h in info["heads"]} == {"sex", "age"}
    losses = [e["val"]["loss"] for e in info["epochs"]]
    assert len(losses) == 2 and info["selection"] == "val_loss"
    assert info["kept_epoch"] == 1 + losses.index(min(losses))
    # the test split's images do not exist (reading one would have raised): every image read
    # was a training or validation subject's
    rows = [json.loads(line) for f in pretrained["cfg"].dataset.T1.records
            for line in open(f) if line.strip()]
    assert (info["train_images"], info["val_images"]) == tuple(
        len({r["subject_id"] for r in rows if r["split"] == split}) for split in ("train", "val"))
    assert any("kept epoch" in line for line in pretrained["log"])


def test_the_folder_scores_records_as_its_kept_epoch_validated_them(pretrained, task_records,
                                                                     tmp_path):
    """score(): the saved tower and heads, read back, answer the validation split exactly as the
    kept epoch did during training (pretrain.json), and any other split with a bootstrap CI."""
    import shutil

    from umbrella.data.catalog import by_split, load_config_records
    from umbrella.training.pretrain import HEADS_FILE, INFO_FILE, score

    folder = pretrained["folder"]
    info = json.loads((folder / INFO_FILE).read_text())
    kept = info["epochs"][info["kept_epoch"] - 1]["val"]["tasks"]
    records = by_split(load_config_records(pretrained["cfg"]))
    got = score(folder, records["val"], resamples=200)
    assert set(got) == set(kept) == {"T1__age", "T1__sex"}
    for key, entry in got.items():
        name = "mae" if entry["task"] == "age" else "accuracy"
        assert entry["n"] == kept[key]["n"]
        assert entry[name] == pytest.approx(kept[key][name], abs=1e-5)
        assert entry["ci"][0] <= entry[name] <= entry["ci"][1]
    good = by_split(load_config_records(dataclasses.replace(
        pretrained["cfg"], dataset=dataclasses.replace(
            pretrained["cfg"].dataset, T1=dataclasses.replace(
                pretrained["cfg"].dataset.T1, records=[str(f) for f in task_records["files"]])))))
    test = score(folder, good["test"], resamples=200)
    assert test["T1__sex"]["n"] == len({r.subject_id for r in good["test"]}) > 0
    copy = tmp_path / "tower"
    shutil.copytree(folder, copy)
    data = bytearray((copy / HEADS_FILE).read_bytes())
    data[-1] ^= 1
    (copy / HEADS_FILE).write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=f"{HEADS_FILE} is not the file"):
        score(copy, records["val"])


def test_the_vlm_starts_from_the_pretrained_tower_and_keeps_it_frozen(pretrained, tiny_cohort,
                                                                      task_records):
    from safetensors.torch import load_file

    from umbrella.training.pretrain import TOWER_FILE
    from umbrella.training.run import train

    saved = load_file(str(pretrained["folder"] / TOWER_FILE))
    cfg = _config(tiny_cohort, task_records["files"], pretrained["out"] / "vlm",
                  f"model.vision_init={pretrained['folder']}", "model.train_embeddings=frozen",
                  "model.train_vision=frozen")
    result = train(cfg, progress=False)
    after = load_file(str(result.model_dir / "model.safetensors"))
    prefix = "model.vision_tower."
    tower = {k[len(prefix):]: v for k, v in after.items() if k.startswith(prefix)}
    assert set(tower) == set(saved)
    for key, value in saved.items():  # weights, BatchNorm and centering statistics untouched
        assert torch.equal(tower[key], value), key
    assert any("running_mean" in k for k in saved) and any("center.mean" in k for k in saved)
    trained = json.loads((result.model_dir / "trainable.json").read_text())
    assert trained["embeddings"] == "frozen"


def test_frozen_embeddings_stay_in_evaluation_mode(tiny_config):
    from umbrella.data.catalog import model_geometry
    from umbrella.data.tokenizer import train_tokenizer
    from umbrella.model.build import build_brain_llava
    from umbrella.model.modeling_brain_vit import BrainPatchEmbedding
    from umbrella.model.trainable import apply_trainable_policy, trainable_summary

    cfg = tiny_config("model.patch_embed=conv", "model.stem_style=pooled",
                      "model.stem_channels=[4,8,16]")
    tok = train_tokenizer(["what is the sex", "male female"], 300)
    model = build_brain_llava(cfg.model, model_geometry(cfg), tok, seed=0)
    apply_trainable_policy(model, embeddings="frozen")
    model.train()
    embeds = [m for m in model.modules() if isinstance(m, BrainPatchEmbedding)]
    assert embeds and all(not m.training for e in embeds for m in e.modules())
    assert model.model.vision_tower.layers[0].training  # the rest trains
    summary = trainable_summary(model)
    assert summary["embeddings.T1"]["trainable"] == 0 and summary["llm"]["trainable"] > 0
    apply_trainable_policy(model, embeddings="full")
    model.train()
    assert all(e.training for e in embeds)
    with pytest.raises(ConfigError, match="train_embeddings"):
        load_config(None, ["model.train_embeddings=lora"])


def test_a_tower_of_another_geometry_or_a_changed_file_is_refused(pretrained, tmp_path):
    import shutil

    from umbrella.data.catalog import model_geometry
    from umbrella.model.build import vision_config
    from umbrella.model.modeling_brain_vit import BrainViTModel
    from umbrella.training.pretrain import TOWER_FILE, load_vision_init

    cfg = pretrained["cfg"]
    other = BrainViTModel(vision_config(
        load_config(None, ["model.patch_embed=conv", "model.stem_style=pooled",
                           "model.stem_channels=[4,8,8]"]).model, model_geometry(cfg)))
    with pytest.raises(ConfigError, match=r"model.vision_init=.*stem_channels=\[4, 8, 16\]"):
        load_vision_init(other, pretrained["folder"], log=lambda *a: None)
    same = BrainViTModel(vision_config(cfg.model, model_geometry(cfg)))
    assert load_vision_init(same, pretrained["folder"], log=lambda *a: None)["loaded"] == ["T1"]
    copy = tmp_path / "tower"
    shutil.copytree(pretrained["folder"], copy)
    data = bytearray((copy / TOWER_FILE).read_bytes())
    data[-1] ^= 1
    (copy / TOWER_FILE).write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="SHA-256"):
        load_vision_init(same, copy, log=lambda *a: None)
    with pytest.raises(ConfigError, match="umbrella pretrain"):
        load_vision_init(same, tmp_path, log=lambda *a: None)


def test_pretrain_refuses_bad_settings(tiny_cohort, task_records, tmp_path, monkeypatch):
    from umbrella.training.pretrain import pretrain

    with pytest.raises(ConfigError) as err:  # ranges: checked on loading, all at once
        load_config(None, ["pretrain.head_dropout=1.0", "pretrain.learning_rate=0",
                           "pretrain.epochs=0", "training.batch_size=0"])
    for key in ("pretrain.head_dropout", "pretrain.learning_rate", "pretrain.epochs",
                "training.batch_size"):
        assert key in str(err.value)
    assert load_config(None, ["pretrain.head_dropout=0.0"]).pretrain.head_dropout == 0.0
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="without torchrun"):
        pretrain(_config(tiny_cohort, task_records["files"], tmp_path), progress=False)


def test_heads_on_the_embeddings_train_only_the_embeddings(tiny_cohort, task_records, tmp_path):
    """pretrain.encoder_layers=false: the encoder layers are saved as initialised (the seed's
    fresh tower), the patch embedding has learned."""
    from safetensors.torch import load_file

    from umbrella.data.catalog import model_geometry
    from umbrella.model.build import vision_config
    from umbrella.model.modeling_brain_vit import BrainViTModel
    from umbrella.training.pretrain import TOWER_FILE, pretrain

    cfg = _config(tiny_cohort, task_records["files"], tmp_path / "runs", "pretrain.epochs=1",
                  "pretrain.encoder_layers=false", f"pretrain.output_dir={tmp_path / 'tower'}")
    saved = load_file(str(pretrain(cfg, progress=False, log=lambda *a: None) / TOWER_FILE))
    torch.manual_seed(cfg.training.seed)
    fresh = BrainViTModel(vision_config(cfg.model, model_geometry(cfg))).state_dict()
    layers = [k for k in saved if k.startswith("layers.")]
    assert layers and all(torch.equal(saved[k], fresh[k]) for k in layers)
    assert not torch.equal(saved["embeddings.T1.stem.0.conv.weight"],
                           fresh["embeddings.T1.stem.0.conv.weight"])


def test_vision_init_pretrain_trains_the_tower_first_then_reuses_it(tiny_cohort, task_records,
                                                                   tmp_path, monkeypatch):
    """model.vision_init=pretrain: one `umbrella train` runs the first stage into pretrain's
    default folder, then trains the VLM on that tower exactly as a run given the folder does; a
    second run of the same config reuses the tower instead of training it again, under torchrun
    too, where training one is refused."""
    from safetensors.torch import load_file

    from umbrella.training import pretrain as stage
    from umbrella.training.run import train

    frozen = ["model.train_embeddings=frozen", "model.train_vision=frozen"]
    cfg = _config(tiny_cohort, task_records["files"], tmp_path / "auto",
                  "model.vision_init=pretrain", *frozen)
    folder = stage.output_dir(cfg)
    assert not folder.exists()
    auto = train(cfg, progress=False)
    assert (folder / stage.INFO_FILE).is_file()
    assert load_config(auto.run_dir / "config.yaml").model.vision_init == "pretrain"
    given = train(_config(tiny_cohort, task_records["files"], tmp_path / "given",
                          f"model.vision_init={folder}", *frozen), progress=False)
    a = load_file(str(auto.model_dir / "model.safetensors"))
    b = load_file(str(given.model_dir / "model.safetensors"))
    assert set(a) == set(b)
    for key in a:  # the same tower, and the VLM trained from it as from the given folder
        assert torch.equal(a[key], b[key]), key
    tower = load_file(str(folder / stage.TOWER_FILE))
    prefix = "model.vision_tower."
    assert {k[len(prefix):] for k in a if k.startswith(prefix)} == set(tower)
    for key, value in tower.items():  # frozen: the VLM holds the first stage's tower
        assert torch.equal(a[prefix + key], value), key

    def fail(*args, **kwargs):
        raise AssertionError("the tower was trained again")

    monkeypatch.setattr(stage, "pretrain", fail)
    before = (folder / stage.TOWER_FILE).stat().st_mtime_ns
    lines = []
    again = stage.first_stage(cfg, progress=False, log=lines.append)
    assert again.model.vision_init == str(folder) and "reusing" in lines[0]
    assert (folder / stage.TOWER_FILE).stat().st_mtime_ns == before

    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun: a complete tower is reused ...
    assert stage.first_stage(cfg, progress=False, log=lines.append).model.vision_init == str(folder)
    monkeypatch.undo()
    monkeypatch.setenv("WORLD_SIZE", "2")  # ... and training one is refused, saying what to run
    other = _config(tiny_cohort, task_records["files"], tmp_path / "other",
                    "model.vision_init=pretrain", *frozen)
    with pytest.raises(ConfigError, match="umbrella pretrain -c CONFIG"):
        stage.first_stage(other, progress=False)
    assert not stage.output_dir(other).exists()
