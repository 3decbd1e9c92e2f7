"""Freeze policies, LoRA, and saving/reloading what a LoRA run trained."""

import warnings

import pytest
import torch

from umbrella.config import ModelConfig
from umbrella.data.prompts import PromptEncoder
from umbrella.data.records import Turn
from umbrella.data.tokenizer import train_tokenizer
from umbrella.errors import ConfigError, ModelError
from umbrella.model.build import build_brain_llava, load_brain_llava
from umbrella.model.trainable import (
    apply_trainable_policy,
    has_lora,
    load_trained,
    save_trained,
    trainable_summary,
)
from umbrella.training.trainer import modality_parameters

GEOM = {"T1": {"image_size": [16, 16, 16], "patch_size": [8, 8, 8]},
        "dMRI": {"image_size": [16, 16, 16], "patch_size": [8, 8, 8]}}
PARTS = {"vision": "vision_encoder", "projector": "projector", "llm": "llm"}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["What is the sex of this subject? male female"] * 4, 300)


@pytest.fixture
def model(tok):
    return build_brain_llava(ModelConfig(), GEOM, tok, seed=0)


@pytest.fixture(scope="module")
def batch(tok):
    enc = PromptEncoder(tok)
    e = enc.encode([Turn("user", "<image>\nWhat is the sex?"), Turn("assistant", "male")], [8])
    torch.manual_seed(1)
    return {"input_ids": torch.tensor([e.input_ids] * 2), "labels": torch.tensor([e.labels] * 2),
            "pixel_values": {"T1": torch.randn(2, 1, 16, 16, 16)}, "image_order": [("T1", 0), ("T1", 1)]}


def _step(model, batch, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize(("vision", "projector", "llm"), [
    ("full", "full", "full"), ("frozen", "frozen", "frozen"), ("frozen", "full", "lora"),
    ("lora", "frozen", "full"), ("lora", "lora", "lora")])
def test_each_policy_sets_requires_grad(model, vision, projector, llm):
    apply_trainable_policy(model, vision=vision, projector=projector, llm=llm)
    summary = trainable_summary(model)
    assert list(summary) == ["embeddings.T1", "embeddings.dMRI", "vision_encoder", "projector", "llm",
                             "lm_head"]
    for m in ("T1", "dMRI"):  # patch embeddings always train, whatever the policies
        assert summary[f"embeddings.{m}"]["trainable"] == summary[f"embeddings.{m}"]["total"] > 0
    for arg, policy in (("vision", vision), ("projector", projector), ("llm", llm)):
        entry = summary[PARTS[arg]]
        if policy == "frozen":
            assert entry["trainable"] == 0
        elif policy == "full":
            assert entry["trainable"] == entry["total"]
        else:
            assert 0 < entry["trainable"] < entry["total"] / 2
    head = summary["lm_head"]
    assert head["trainable"] == (head["total"] if llm == "full" else 0)
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad
        elif p.requires_grad and not name.startswith("model.vision_tower.embeddings."):
            part = next(a for a, prefix in (("vision", "model.vision_tower."), ("projector", "model.multi_modal_projector."),
                                            ("llm", "model.language_model."), ("llm", "lm_head.")) if name.startswith(prefix))
            assert {"vision": vision, "projector": projector, "llm": llm}[part] == "full", name
    assert set(modality_parameters(model)) == {"T1", "dMRI"}  # the trainer still finds them


def test_lora_stays_inside_its_part(model):
    apply_trainable_policy(model, vision="lora", projector="frozen", llm="frozen",
                           lora_targets={"vision": ["q_proj", "v_proj"]})
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert wrapped == {f"model.vision_tower.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}


def test_lora_on_the_llm_trains_only_lora_and_embeddings(model, batch):
    apply_trainable_policy(model, vision="frozen", projector="frozen", llm="lora")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = _step(model, batch)
    assert torch.isfinite(loss)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "nothing trained"
    assert all("lora_" in k or k.startswith("model.vision_tower.embeddings.T1.") for k in changed), changed
    assert any("lora_B" in k for k in changed)
    assert "model.vision_tower.embeddings.T1.proj.weight" in changed


def test_lora_adapters_save_and_reload_with_identical_logits(model, batch, tok, tmp_path):
    apply_trainable_policy(model, projector="frozen", llm="lora", lora_dropout=0.0)
    _step(model, batch)
    _step(model, batch)
    expected = _logits(model, batch)
    folder = save_trained(model, tmp_path / "run", tok)
    assert {"config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors",
            "trainable.json"} <= {p.name for p in folder.iterdir()}

    again, tok2 = load_trained(folder)
    assert torch.equal(_logits(again, batch), expected)
    assert tok2(" male").input_ids == tok(" male").input_ids
    assert trainable_summary(again) == trainable_summary(model)  # the policy came back too
    plain, _ = load_brain_llava(folder)  # the project's loader applies the adapter as well
    assert torch.equal(_logits(plain, batch), expected)

    _step(again, batch)  # training goes on; a second save/reload round trip stays exact
    expected = _logits(again, batch)
    third, _ = load_trained(save_trained(again, tmp_path / "resumed"))
    assert torch.equal(_logits(third, batch), expected)


def test_full_policy_save_is_a_plain_checkpoint(model, batch, tmp_path):
    apply_trainable_policy(model, vision="frozen")
    folder = save_trained(model, tmp_path)
    assert not (folder / "adapter_config.json").exists()
    again, tok = load_trained(folder)
    assert tok is None and not has_lora(again)
    assert torch.equal(_logits(again, batch), _logits(model, batch))
    assert trainable_summary(again)["vision_encoder"]["trainable"] == 0


def test_save_refuses_a_folder_with_a_stale_adapter(model, tok, tmp_path):
    lora = build_brain_llava(ModelConfig(), GEOM, tok, seed=0)
    save_trained(apply_trainable_policy(lora, llm="lora"), tmp_path)
    with pytest.raises(ModelError, match="holds adapter_config.json, trainable.json from an earlier save"):
        save_trained(model, tmp_path)  # no LoRA: the old adapter would be applied to these weights


def test_unknown_policy_and_targets_raise_config_errors(model):
    with pytest.raises(ConfigError, match=r"model.trainable.llm='qlora' is not a policy; choose one of frozen, full, lora"):
        apply_trainable_policy(model, llm="qlora")
    with pytest.raises(ConfigError, match=r"model.lora.targets has unknown part\(s\) text"):
        apply_trainable_policy(model, llm="lora", lora_targets={"text": ["q_proj"]})
    with pytest.raises(ConfigError, match=r"model.lora.targets.llm=\['query'\] matches no Linear layer.*q_proj"):
        apply_trainable_policy(model, llm="lora", lora_targets={"llm": ["query"]})
    with pytest.raises(ConfigError) as both:  # all problems reported together
        apply_trainable_policy(model, vision="half", llm="lora", lora_targets={"text": ["q_proj"]})
    assert len(both.value.problems) == 2
    assert not has_lora(model)


def test_lora_twice_raises(model):
    apply_trainable_policy(model, llm="lora")
    with pytest.raises(ModelError, match="already holds LoRA layers"):
        apply_trainable_policy(model, llm="lora")


def test_gradient_checkpointing_still_trains_a_step(model, batch):
    apply_trainable_policy(model, vision="lora", projector="full", llm="lora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed it activation_checkpointing_enable
        model.gradient_checkpointing_enable()
    assert model.model.language_model.layers[0].gradient_checkpointing
    assert model.model.vision_tower.layers[0].gradient_checkpointing
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = _step(model, batch)
    assert torch.isfinite(loss)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any("language_model" in k and "lora_B" in k for k in changed)
    assert any("vision_tower.layers" in k and "lora_B" in k for k in changed)
    assert "model.vision_tower.embeddings.T1.proj.weight" in changed
    assert not any("base_layer" in k for k in changed)
