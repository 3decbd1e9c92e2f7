import json

import pytest
import torch

from umbrella.errors import ConfigError
from umbrella.model.build import load_brain_llava
from umbrella.training.run import train


def test_tiny_training_lowers_the_loss_and_saves_a_complete_run(tiny_config):
    cfg = tiny_config("training.max_steps=30")
    result = train(cfg, progress=False)
    hist = json.loads((result.run_dir / "log_history.json").read_text())
    losses = [h["loss"] for h in hist if "loss" in h]
    assert len(losses) == 6
    assert losses[-1] < 0.5 * losses[0], losses
    for name in ("config.yaml", "env.json", "splits.json", "model/model.safetensors",
                 "model/tokenizer.json", "model/preprocessing.json"):
        assert (result.run_dir / name).is_file(), name
    assert result.run_dir.name == "seed_0" and result.run_dir.parent.name.startswith("sex__tiny__")
    splits = json.loads((result.run_dir / "splits.json").read_text())
    assert set(splits.values()) == {"train", "val", "test"}
    model, _ = load_brain_llava(result.model_dir)
    assert not model.training
    assert model.config.vision_config.modalities["T1"]["image_size"] == [32, 32, 32]


def test_same_seed_same_losses(tiny_config):
    runs = []
    for out in ("a", "b"):
        cfg = tiny_config("training.max_steps=6", "training.logging_steps=1",
                          f"training.run_name={out}")
        res = train(cfg, progress=False)
        hist = json.loads((res.run_dir / "log_history.json").read_text())
        runs.append([h["loss"] for h in hist if "loss" in h])
    assert runs[0] == runs[1]
    assert torch.get_num_threads() >= 1


def test_lora_run_saves_adapters_that_reload(tiny_config):
    from umbrella.data.catalog import load_preprocessing
    from umbrella.data.dataset import InstructionDataset
    from umbrella.data.prompts import PromptEncoder
    from umbrella.data.records import load_records
    from umbrella.model.answering import score_options

    cfg = tiny_config("training.max_steps=3", "model.train_llm=lora", "model.train_vision=frozen",
                      "training.run_name=lora")
    result = train(cfg, progress=False)
    assert (result.model_dir / "adapter_model.safetensors").is_file()
    model, tok = load_brain_llava(result.model_dir)
    names = [n for n, _ in model.named_parameters()]
    assert any("lora_A" in n for n in names)
    recs = load_records(cfg.dataset.T1.records[0], {"T1": cfg.dataset.T1.data_root})[:2]
    ds = InstructionDataset(recs, PromptEncoder(tok), load_preprocessing(result.model_dir))
    scores = score_options(model, PromptEncoder(tok), [ds.scoring_sample(i) for i in range(2)],
                           [["male", "female"]] * 2)
    assert all(torch.isfinite(s).all() for s in scores)


def test_pretrained_llava_base_is_converted_and_trained(tiny_config, tmp_path):
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from umbrella.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["What is the sex of this subject? male female"] * 4, 300)
    torch.manual_seed(0)
    base = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=8, patch_size=4),
        text_config=Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full"))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    result = train(tiny_config("training.max_steps=3", "training.logging_steps=1",
                               f"model.base={tmp_path / 'base'}"), progress=False)
    model, _ = load_brain_llava(result.model_dir)
    assert model.config.vision_config.hidden_size == 32  # the base's tower width
    original = base.model.language_model.layers[0].mlp.up_proj.weight
    assert original.shape == model.model.language_model.layers[0].mlp.up_proj.weight.shape
    hist = json.loads((result.run_dir / "log_history.json").read_text())
    assert len([h for h in hist if "loss" in h]) == 3


def test_more_local_ranks_than_gpus_is_refused(monkeypatch):
    from umbrella.training import run as run_mod

    monkeypatch.setattr(run_mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(run_mod.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"2 processes per node but 1 CUDA device.*"
                                          r"--nproc_per_node 1"):
        run_mod.check_devices()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    run_mod.check_devices()  # one rank per GPU is fine


@pytest.mark.parametrize(("pool", "saved", "tokens"), [("2", [2, 2, 2], 8), ("all", "all", 1)])
def test_token_pool_from_config_trains_saves_and_scores(tiny_config, pool, saved, tokens):
    from umbrella.data.catalog import load_preprocessing
    from umbrella.data.dataset import InstructionDataset
    from umbrella.data.prompts import PromptEncoder
    from umbrella.data.records import load_records
    from umbrella.model.answering import score_options
    from umbrella.model.build import tokens_per_image

    cfg = tiny_config("training.max_steps=2", f"model.token_pool={pool}", "training.run_name=pool")
    result = train(cfg, progress=False)
    model, tok = load_brain_llava(result.model_dir)
    inputs = load_preprocessing(result.model_dir)
    assert model.config.vision_token_pool == saved
    # 32³ / patch 8 = a 4×4×4 grid of 64 tokens, pooled 2×2×2 into 8 (all: into 1)
    assert inputs["T1"].tokens == tokens_per_image(model, "T1") == tokens
    recs = load_records(cfg.dataset.T1.records[0], {"T1": cfg.dataset.T1.data_root})[:2]
    ds = InstructionDataset(recs, PromptEncoder(tok), inputs)
    scores = score_options(model, PromptEncoder(tok), [ds.scoring_sample(i) for i in range(2)],
                           [["male", "female"]] * 2)
    assert all(torch.isfinite(s).all() for s in scores)


def test_token_pool_that_does_not_divide_the_grid_is_a_config_error(tiny_config):
    from umbrella.data.catalog import modality_inputs

    with pytest.raises(ConfigError, match=r"model.token_pool=3.*not a multiple"):
        modality_inputs(tiny_config("model.token_pool=3"))
    with pytest.raises(ConfigError, match=r"'model.token_pool': token_pool must be a positive integer"):
        modality_inputs(tiny_config("model.token_pool=0"))  # refused when the config loads
