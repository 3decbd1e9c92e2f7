"""Pretrained LLaVA -> BrainLlava, on tiny LLaVAs built offline with the real classes (CLIP + Llama as
in LLaVA-1.5, SigLIP + Qwen2 as in llava-interleave-qwen), saved to disk and converted from there."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from umbrella.data.tokenizer import train_tokenizer
from umbrella.errors import ModelError
from umbrella.model.build import load_brain_llava
from umbrella.model.convert import CHATML, VICUNA, convert_pretrained_llava, feature_layers
from umbrella.training.trainer import modality_parameters

T1 = {"T1": {"image_size": [16, 16, 16], "patch_size": [8, 8, 8]}}  # 8 visual tokens
N_TOKENS = 8
TEXT = ["What is the sex of this subject? male female", "USER: ASSISTANT: yes no"] * 4
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": 8, "patch_size": 4}
LLM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2}


def vicuna_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama/Vicuna-like vocabulary: <s>, </s>, <unk>, <pad>, <image>; no ChatML tokens."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", extra_special_tokens=["<image>"])


def _save_base(folder, tok, vision_config, text_config, **llava):
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_id=tok.convert_tokens_to_ids("<image>"), **llava)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_base(tmp_path_factory):
    """LLaVA-1.5 shape: CLIP tower (quick_gelu, CLS, pre_layrnorm), feature layer -2, Llama LLM."""
    tok = vicuna_tokenizer()
    return _save_base(tmp_path_factory.mktemp("clip_llama"), tok,
                      CLIPVisionConfig(**VISION, hidden_act="quick_gelu"),
                      LlamaConfig(vocab_size=len(tok), **LLM),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")


@pytest.fixture(scope="module")
def siglip_base(tmp_path_factory):
    """llava-interleave-qwen shape: SigLIP tower, feature layer -1, Qwen2 LLM with tied embeddings."""
    tok = train_tokenizer(TEXT, 300)
    return _save_base(tmp_path_factory.mktemp("siglip_qwen"), tok, SiglipVisionConfig(**VISION),
                      Qwen2Config(vocab_size=len(tok), tie_word_embeddings=True, **LLM),
                      vision_feature_layer=-1, vision_feature_select_strategy="full")


@pytest.fixture(scope="module", params=["clip_base", "siglip_base"])
def converted(request):
    base = request.getfixturevalue(request.param)
    model, tok, fmt = convert_pretrained_llava(base, T1)
    return base, model, tok, fmt


def _source(folder):
    return LlavaForConditionalGeneration.from_pretrained(folder)


def _encoder_layers(source):
    tower = source.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers


def _conversation(tok, fmt, answer="male"):
    """(input_ids, labels) built from the chat format's segments alone."""
    chat = {"chatml": CHATML, "vicuna": VICUNA}[fmt]

    def ids(text):
        return tok(text, add_special_tokens=False).input_ids

    image = tok.convert_tokens_to_ids("<image>")
    prompt = (ids(chat.system + chat.user_header) + [image] * N_TOKENS
              + ids("\nWhat is the sex?" + chat.user_end) + ids(chat.assistant_header))
    target = ids(chat.answer_prefix + answer) + [tok.convert_tokens_to_ids(chat.end_token)]
    return prompt, prompt + target, [-100] * len(prompt) + target


def test_clip_llama_base_becomes_vicuna_with_its_feature_layer(clip_base):
    model, tok, fmt = convert_pretrained_llava(clip_base, T1)
    source = _source(clip_base)
    assert fmt == "vicuna"
    cfg = model.config
    # the base read layer -2 of 2: layer 1 (the last) is dropped, its features are now layer -1
    assert cfg.vision_config.num_hidden_layers == 1 and len(model.model.vision_tower.layers) == 1
    assert cfg.vision_feature_layer == -1 and cfg.vision_feature_select_strategy == "full"
    assert cfg.vision_config.hidden_act == "quick_gelu"
    assert cfg.image_token_id == source.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "pre_layrnorm" in n or "post_layernorm" in n or "class_embedding" in n]
    text = tok.apply_chat_template([{"role": "user", "content": "<image>\nQ?"},
                                    {"role": "assistant", "content": "male"}], tokenize=False)
    assert text == VICUNA.system + "USER: <image>\nQ? ASSISTANT: male</s>"
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("</s>")


def test_siglip_qwen_base_becomes_chatml_and_keeps_tied_head(siglip_base):
    model, tok, fmt = convert_pretrained_llava(siglip_base, T1, dtype=torch.bfloat16)
    assert fmt == "chatml"
    assert model.config.vision_config.num_hidden_layers == 2 and model.config.vision_feature_layer == -1
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    text = tok.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == CHATML.user_header + "Q?" + CHATML.user_end + CHATML.assistant_header
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_encoder_projector_and_llm_weights_equal_the_base(converted):
    base, model, _, _ = converted
    source = _source(base)
    src_layers = _encoder_layers(source)
    for i, layer in enumerate(model.model.vision_tower.layers):
        src = src_layers[i].state_dict()
        assert set(layer.state_dict()) == set(src)  # layer_norm1/2, self_attn.{q,k,v,out}_proj, mlp.fc1/2
        assert all(torch.equal(v, src[k]) for k, v in layer.state_dict().items())
        hidden = torch.randn(2, 5, 32)  # same function, not only same numbers
        with torch.no_grad():
            assert torch.allclose(layer.eval()(hidden, None), src_layers[i].eval()(hidden, None), atol=1e-6)
    for part in ("multi_modal_projector", "language_model"):
        ours, theirs = getattr(model.model, part).state_dict(), getattr(source.model, part).state_dict()
        assert set(ours) == set(theirs)
        assert all(torch.equal(v, theirs[k]) for k, v in ours.items())
    assert torch.equal(model.lm_head.weight, source.lm_head.weight)


def test_new_patch_embedding_is_sized_and_initialised(converted):
    _, model, _, _ = converted
    emb = model.model.vision_tower.embeddings["T1"]
    assert emb.proj.weight.shape == (32, 1, 8, 8, 8)
    assert emb.position_embedding.shape == (1, N_TOKENS, 32)
    assert 0.01 < emb.position_embedding.std().item() < 0.03  # trunc normal, std 0.02
    assert emb.position_embedding.abs().max().item() <= 0.04 + 1e-6  # truncated at 2 std
    assert set(modality_parameters(model)) == {"T1"}  # the trainer finds the embedding by name


def test_converted_model_trains_a_step_generates_and_reloads(converted, tmp_path):
    _, model, tok, fmt = converted
    prompt, full, labels = _conversation(tok, fmt)
    ids, labels = torch.tensor([full]), torch.tensor([labels])
    x = torch.randn(1, 1, 16, 16, 16)
    model.train()
    before = model.model.vision_tower.embeddings["T1"].proj.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(input_ids=ids, pixel_values={"T1": x}, image_order=[("T1", 0)], labels=labels).loss
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.model.vision_tower.embeddings["T1"].proj.weight)

    model.eval()
    with torch.no_grad():
        mm = model.encode_images({"T1": x}, [("T1", 0)])
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             mm_encoder_outputs=mm, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        direct = model(input_ids=torch.tensor([prompt]), pixel_values={"T1": x}, image_order=[("T1", 0)]).logits
    new = out.sequences[0, len(prompt):]
    assert new.shape == (3,) and int(new.max()) < model.config.text_config.vocab_size
    assert torch.allclose(out.logits[0][0], direct[0, -1], atol=1e-5)  # generation saw the image

    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_brain_llava(tmp_path)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values={"T1": x}, image_order=[("T1", 0)]).logits
        b = again(input_ids=ids, pixel_values={"T1": x}, image_order=[("T1", 0)]).logits
    assert torch.equal(a, b)
    assert tok2(" male").input_ids == tok(" male").input_ids


def test_chat_templates_agree_with_the_segments():
    for chat in (CHATML, VICUNA):
        tok = train_tokenizer(TEXT, 300) if chat is CHATML else vicuna_tokenizer()
        tok.chat_template = chat.template
        turns = [("user", "<image>\nQ1?"), ("assistant", "a1"), ("user", "Q2?"), ("assistant", "a2")]
        rendered = tok.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False)
        expected = chat.system + "".join(
            chat.user_header + c + chat.user_end if r == "user"
            else chat.assistant_header + chat.answer_prefix + c + chat.end_token + chat.after_answer
            for r, c in turns)
        assert rendered == expected


@pytest.mark.parametrize(("layer", "n", "keep", "moved"), [
    (-2, 24, 23, -1), (-1, 27, 27, -1), (3, 24, 3, -1), ([-2, -5], 24, 23, [-1, -4])])
def test_feature_layers_keep_only_what_llava_reads(layer, n, keep, moved):
    assert feature_layers(layer, n) == (keep, moved)


def test_feature_layer_outside_the_encoder_raises():
    with pytest.raises(ModelError, match="does not select encoder layer outputs of a 24-layer tower"):
        feature_layers(-25, 24)


def test_bad_bases_raise_model_errors_naming_the_base(tmp_path, siglip_base):
    with pytest.raises(ModelError, match=r"model.base=.*nowhere.*cannot read its config"):
        convert_pretrained_llava(tmp_path / "nowhere", T1)
    Qwen2Config(vocab_size=300, **LLM).save_pretrained(tmp_path / "qwen")
    with pytest.raises(ModelError, match="is a 'qwen2' model, not LLaVA"):
        convert_pretrained_llava(tmp_path / "qwen", T1)
    # a tokenizer whose <image> id differs from the model's image_token_id
    model = _source(siglip_base)
    model.config.image_token_id = 5
    model.save_pretrained(tmp_path / "mismatch")
    train_tokenizer(TEXT, 300).save_pretrained(tmp_path / "mismatch")
    with pytest.raises(ModelError, match=r"maps <image> to 1 but the model's image_token_id is 5"):
        convert_pretrained_llava(tmp_path / "mismatch", T1)


def test_converted_base_takes_the_conv_stem_and_reloads(siglip_base, tmp_path):
    from umbrella.config import ModelConfig
    from umbrella.model.build import with_patch_embed

    specs = with_patch_embed(ModelConfig(patch_embed="conv", stem_channels=[8, 16, 32]), T1)
    model, tok, _ = convert_pretrained_llava(siglip_base, specs)
    emb = model.model.vision_tower.embeddings["T1"]
    assert [s.conv.out_channels for s in emb.stem] == [8, 16, 32] and emb.proj.kernel_size == (1, 1, 1)
    expected = (2.0 / (8 * 27)) ** 0.5  # Kaiming normal, fan_out
    assert abs(emb.stem[0].conv.weight.std().item() / expected - 1) < 0.15
    assert 0.01 < emb.position_embedding.std().item() < 0.03
    assert {n.split(".")[0] for n, _ in emb.named_parameters()} == {"stem", "proj", "position_embedding"}
    x = torch.randn(1, 1, 16, 16, 16)
    prompt, _, _ = _conversation(tok, "chatml")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, _ = load_brain_llava(tmp_path)
    with torch.no_grad():
        a = model.eval()(input_ids=torch.tensor([prompt]), pixel_values={"T1": x}, image_order=[("T1", 0)]).logits
        b = again(input_ids=torch.tensor([prompt]), pixel_values={"T1": x}, image_order=[("T1", 0)]).logits
    assert torch.equal(a, b)
