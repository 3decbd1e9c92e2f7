"""Which parts of BrainLlava train: frozen, full or LoRA, per part; patch embeddings train unless
frozen (``model.train_embeddings=frozen``, e.g. over a tower from ``umbrella pretrain``).

Parts, found by parameter name::

    embeddings.<modality>  model.vision_tower.embeddings.<modality>.*   policy `embeddings` (full | frozen)
    vision_encoder         model.vision_tower.* (the encoder layers)    policy `vision`
    projector              model.multi_modal_projector.*                 policy `projector`
    llm                    model.language_model.*                        policy `llm`
    lm_head                lm_head.*                                     follows `llm` ("full" only)

LoRA layers are injected in place (PEFT ``inject_adapter_in_model``): the model stays a
``BrainLlavaForConditionalGeneration``, parameter names keep their prefixes (the trainer still finds
the modality embeddings), and one adapter ("default") covers every part whose policy is "lora".

Saving (:func:`save_trained`) keeps the adapters separate, not merged, so a reload reproduces the
logits exactly and training can go on::

    folder/config.json, model.safetensors   every non-LoRA weight under its ordinary name
    folder/adapter_config.json              the LoraConfig (PEFT format)
    folder/adapter_model.safetensors        the LoRA weights (PEFT format)
    folder/trainable.json                   the policies, to restore requires_grad on reload

``BrainLlavaForConditionalGeneration.from_pretrained(folder)`` (hence ``load_brain_llava``) finds
the adapter next to the config and applies it too, for inference; :func:`load_trained` rebuilds
the same injected layout as training, with the adapter trainable.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from umbrella.errors import ConfigError, ModelError
from umbrella.model.modeling_brain_vit import BrainPatchEmbedding

POLICIES = ("frozen", "full", "lora")
PART_PREFIXES = {"vision": "model.vision_tower.", "projector": "model.multi_modal_projector.",
                 "llm": "model.language_model."}
DEFAULT_LORA_TARGETS = {
    "vision": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "projector": ["linear_1", "linear_2"],
    "llm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
POLICY_FILE = "trainable.json"
_EMBEDDING = re.compile(r"vision_tower\.embeddings\.([A-Za-z0-9]+)\.")
_PART = (("vision_encoder", "vision_tower."), ("projector", "multi_modal_projector."),
         ("llm", "language_model."), ("lm_head", "lm_head."))


def part_of(name: str) -> str:
    """'model.vision_tower.embeddings.T1.proj.weight' -> 'embeddings.T1', '...language_model.*' -> 'llm'.
    """
    if match := _EMBEDDING.search(name):
        return f"embeddings.{match.group(1)}"
    for part, marker in _PART:
        if name.startswith(marker) or f".{marker}" in name:
            return part
    raise ModelError(f"parameter {name!r} belongs to no known part of BrainLlava "
                     "(vision tower, projector, language model, lm_head)")


EMBEDDING_POLICIES = ("full", "frozen")


def _policy_of(part: str, policies: dict[str, str]) -> str:
    if part.startswith("embeddings."):
        return policies.get("embeddings", "full")
    if part == "lm_head":
        return "full" if policies["llm"] == "full" else "frozen"
    return policies[{"vision_encoder": "vision"}.get(part, part)]


def _check_policies(policies: dict[str, str], lora_targets: dict | None) -> None:
    """Every problem at once, in one ConfigError naming the config keys."""
    problems = [f"model.trainable.{part} is missing" for part in PART_PREFIXES
                if part not in policies]
    problems += [f"model.trainable.{part}={value!r} is not a policy; choose one of "
                 f"{', '.join(POLICIES)}" for part, value in policies.items()
                 if part in PART_PREFIXES and value not in POLICIES]
    problems += [f"model.train_embeddings={value!r} is not a policy; choose one of "
                 f"{', '.join(EMBEDDING_POLICIES)}" for part, value in policies.items()
                 if part == "embeddings" and value not in EMBEDDING_POLICIES]
    problems += [f"model.trainable.{part} is not a part; parts are "
                 f"{', '.join([*PART_PREFIXES, 'embeddings'])}" for part in policies
                 if part not in PART_PREFIXES and part != "embeddings"]
    unknown = sorted(set(lora_targets or {}) - set(DEFAULT_LORA_TARGETS))
    if unknown:
        problems.append(f"model.lora.targets has unknown part(s) {', '.join(unknown)}; parts are "
                        f"{', '.join(DEFAULT_LORA_TARGETS)}")
    if problems:
        raise ConfigError(problems)


def lora_pattern(model, parts: list[str], targets: dict[str, list[str]]) -> str:
    """A regex (PEFT full-match) over module names: the target Linear layers inside ``parts`` only.
    Raises ConfigError, listing the part's Linear layer names, when a part's targets match nothing."""
    pieces, problems = [], []
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for part in parts:
        prefix = PART_PREFIXES[part]
        names = targets[part]
        piece = rf"{re.escape(prefix)}(?:.*\.)?(?:{'|'.join(map(re.escape, names))})"
        in_part = [n for n in linear if n.startswith(prefix) and not _EMBEDDING.search(n)]
        if not any(re.fullmatch(piece, n) for n in in_part):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in in_part})
            problems.append(f"model.lora.targets.{part}={names} matches no Linear layer of the "
                            f"{part}; its Linear layers are named {', '.join(leaves) or '(none)'}")
        pieces.append(piece)
    if problems:
        raise ConfigError(problems)
    return "|".join(f"(?:{p})" for p in pieces)


def has_lora(model) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())


def apply_trainable_policy(model, *, vision: str = "full", projector: str = "full",
                           llm: str = "full", lora_r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.05,
                           lora_targets: dict[str, list[str]] | None = None, embeddings: str = "full"):
    """Set ``requires_grad`` per part; inject LoRA (one adapter) into the parts whose policy is "lora".

    Each policy is "frozen" | "full" | "lora". ``lora_targets`` overrides, per part ("vision",
    "projector", "llm"), the Linear layer names LoRA wraps (defaults: DEFAULT_LORA_TARGETS).
    ``embeddings`` ("full" | "frozen") covers every modality's patch embedding (stem, projection,
    positions, population centering): frozen ones keep their weights and run in evaluation mode
    (BatchNorm and centering use their stored statistics) while the rest trains. Returns the same
    model object, changed in place; the policies are kept on it (``model.trainable_policy``) so
    that :func:`save_trained` records them.
    """
    policies = {"vision": vision, "projector": projector, "llm": llm, "embeddings": embeddings}
    _check_policies(policies, lora_targets)
    lora_parts = [p for p, v in policies.items() if v == "lora"]
    if lora_parts:
        if has_lora(model):
            raise ModelError("this model already holds LoRA layers; apply the trainable policy once, "
                             "to a model without adapters (load_trained restores saved ones)")
        targets = {**DEFAULT_LORA_TARGETS, **(lora_targets or {})}
        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
                            target_modules=lora_pattern(model, lora_parts, targets))
        inject_adapter_in_model(config, model)
    _set_requires_grad(model, policies)
    return model


def _set_requires_grad(model, policies: dict[str, str]) -> None:
    for name, param in model.named_parameters():
        policy = _policy_of(part_of(name), policies)
        param.requires_grad_(policy == "full" or (policy == "lora" and "lora_" in name))
    frozen = policies.get("embeddings", "full") == "frozen"
    for module in model.modules():
        if isinstance(module, BrainPatchEmbedding):
            module.frozen = frozen
            module.train(module.training)  # a frozen embedding drops to evaluation mode now
    if policies["llm"] != "full":  # frozen input embeddings: keep activations differentiable
        model.enable_input_require_grads()
    model.trainable_policy = dict(policies)


def trainable_summary(model) -> dict[str, dict[str, int]]:
    """{part: {"trainable": n, "total": n}} for each modality embedding, vision_encoder, projector,
    llm and lm_head. Each parameter is counted once: a tied lm_head's weight counts under llm."""
    summary = {}
    for name, param in model.named_parameters():
        entry = summary.setdefault(part_of(name), {"trainable": 0, "total": 0})
        entry["total"] += param.numel()
        entry["trainable"] += param.numel() if param.requires_grad else 0
    order = sorted(p for p in summary if p.startswith("embeddings.")) + [p for p, _ in _PART]
    return {p: summary.get(p, {"trainable": 0, "total": 0}) for p in order}


def _base_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict without LoRA weights, LoRA-wrapped layers under their ordinary names."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
            if "lora_" not in k}


def save_trained(model, folder: str | Path, tokenizer=None) -> Path:
    """Save a trained model (and its tokenizer) so that :func:`load_trained` reproduces its logits.

    Without LoRA this is ``save_pretrained``. With LoRA, the adapters are saved unmerged beside the
    other weights (layout in the module docstring): merging would change the logits by rounding and
    end the adapter's training. ``trainable.json`` records the policy, for :func:`load_trained`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    policy = getattr(model, "trainable_policy", None)
    rewrites = {ADAPTER_CONFIG: has_lora(model), POLICY_FILE: policy is not None}
    stale = [name for name, rewritten in rewrites.items() if (folder / name).exists() and not rewritten]
    if stale:  # from_pretrained would apply a stale adapter to these weights
        raise ModelError(f"{folder} holds {', '.join(stale)} from an earlier save that this model would "
                         "not replace; save into a new folder")
    if not has_lora(model):
        model.save_pretrained(folder)
    else:
        loaded_by_transformers = getattr(model, "_hf_peft_config_loaded", False)
        model._hf_peft_config_loaded = False  # else save_pretrained writes the adapter alone
        try:
            model.save_pretrained(folder, state_dict=_base_state_dict(model))
        finally:
            model._hf_peft_config_loaded = loaded_by_transformers
        adapter = get_peft_model_state_dict(model)
        save_file({f"base_model.model.{k}": v.contiguous() for k, v in adapter.items()},
                  folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        model.peft_config["default"].save_pretrained(folder)
    if policy is not None:
        (folder / POLICY_FILE).write_text(json.dumps(policy, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_trained(folder: str | Path, device: str | torch.device = "cpu"):
    """Reload what :func:`save_trained` wrote: (model, tokenizer or None), logits exactly equal.

    transformers' ``from_pretrained`` applies the adapter files beside config.json (inference
    only); this then makes the model what training left: the saved policy's ``requires_grad``
    (LoRA weights trainable) and a plain injected adapter that ``save_pretrained`` saves whole.
    """
    from transformers import AutoTokenizer

    from umbrella.model.build import BrainLlavaForConditionalGeneration

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} holds no saved model (config.json missing); point at the "
                         "folder save_trained wrote")
    model = BrainLlavaForConditionalGeneration.from_pretrained(folder, use_safetensors=True)
    if (folder / ADAPTER_CONFIG).is_file():
        if not has_lora(model):
            raise ModelError(f"{folder / ADAPTER_CONFIG} was not applied on loading; install peft "
                             "(pip install peft) so that transformers loads the adapter")
        model._hf_peft_config_loaded = False
        model.peft_config["default"].inference_mode = False
    if (folder / POLICY_FILE).is_file():
        policies = json.loads((folder / POLICY_FILE).read_text())
        try:
            _check_policies(policies, None)
        except ConfigError as exc:
            raise ModelError(f"{folder / POLICY_FILE}: {exc}; save the model again with "
                             "save_trained") from exc
        _set_requires_grad(model, policies)
    model.to(device)
    has_tokenizer = (folder / "tokenizer_config.json").is_file()
    return model, AutoTokenizer.from_pretrained(folder) if has_tokenizer else None
