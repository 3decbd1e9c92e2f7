"""Two ways to get an answer from BrainLlava, shared by training (validation metric, generation
log), evaluation, `ask` and `serve`: they sit with the model, below all of them.

- likelihood: every allowed option is appended to the prompt and scored by the sum of the
  log-probabilities of its tokens and the closing ``<|im_end|>``; a softmax over the options gives
  probabilities (for ROC-AUC). Images are encoded once per record, not once per option.
  :func:`score_options` runs prompt + option as one sequence per option (a few options);
  :func:`score_options_cached` runs each prompt once and continues every option from its key/value
  cache (hundreds of candidate numbers, see :mod:`umbrella.evaluation.regression`). Both give the
  same numbers up to float rounding.
- generate: greedy decoding (deterministic), stopped at ``<|im_end|>``. For regression answers
  :func:`numeric_answer_processor` can restrict decoding to digits, '.', spaces, the unit's tokens
  and the end token ("digit-constrained decoding").
"""

from __future__ import annotations

import copy
import inspect
import re

import torch
from transformers import LlavaForConditionalGeneration, LogitsProcessor, LogitsProcessorList

from umbrella.data.collate import BrainCollator
from umbrella.data.prompts import PromptEncoder


def _stack_images(items: list[list[tuple[str, torch.Tensor]]]):
    """[[(modality, (C, D, H, W)), ...] per record] -> pixel_values dict + image_order."""
    stacks: dict[str, list[torch.Tensor]] = {}
    order = []
    for images in items:
        for modality, tensor in images:
            stacks.setdefault(modality, []).append(tensor)
            order.append((modality, len(stacks[modality]) - 1))
    return {m: torch.stack(v) for m, v in stacks.items()}, order


@torch.no_grad()
def score_options(model, encoder: PromptEncoder, samples: list[dict],
                  options: list[list[str]]) -> list[torch.Tensor]:
    """Log-likelihood of each option per sample.

    samples: dicts with "images" [(modality, tensor)] and "turns" (the conversation up to the answer)
    options: per sample, the answers to score. Returns per sample a (K,) float tensor.
    """
    device = model.device
    pixel_values, order = _stack_images([s["images"] for s in samples])
    pixel_values = {m: v.to(device) for m, v in pixel_values.items()}
    feats = model.image_features(pixel_values, order) if order else []
    seqs, answer_lens, seq_feats, cursor = [], [], [], 0
    for sample, opts in zip(samples, options, strict=True):
        n_img = len(sample["images"])
        mine = feats[cursor:cursor + n_img]
        cursor += n_img
        prompt = encoder.encode_prompt(sample["turns"], sample["image_tokens"])
        for opt in opts:
            answer = encoder.answer_ids(opt)
            seqs.append(prompt + answer)
            answer_lens.append(len(answer))
            seq_feats += mine
    collate = BrainCollator(encoder.tok.pad_token_id, padding_side="right")
    batch = collate([{"input_ids": torch.tensor(s), "attention_mask": torch.ones(len(s), dtype=torch.long),
                      "images": [], "id": ""} for s in seqs])
    mm = {"image": _pooled(seq_feats)} if seq_feats else None
    logits = model(input_ids=batch["input_ids"].to(device),
                   attention_mask=batch["attention_mask"].to(device), mm_encoder_outputs=mm).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    scores = []
    for row, (seq, n_ans) in enumerate(zip(seqs, answer_lens, strict=True)):
        start = len(seq) - n_ans
        targets = torch.tensor(seq[start:], device=device)
        scores.append(logp[row, start - 1:len(seq) - 1].gather(1, targets[:, None]).sum().item())
    out, k = [], 0
    for opts in options:
        out.append(torch.tensor(scores[k:k + len(opts)]))
        k += len(opts)
    return out


# transformers renamed forward's ``past_key_values`` to ``cache`` during 5.x
_CACHE_KWARG = ("cache" if "cache" in inspect.signature(LlavaForConditionalGeneration.forward).parameters
                else "past_key_values")


@torch.no_grad()
def score_options_cached(model, encoder: PromptEncoder, samples: list[dict],
                         options: list[list[str]], batch_size: int = 64) -> list[torch.Tensor]:
    """:func:`score_options` with each sample's prompt (images + question) run through the model
    once: the options are scored ``batch_size`` at a time as continuations of the prompt's
    key/value cache, repeated along the batch dimension. Returns per sample a (K,) float tensor."""
    device = model.device
    pixel_values, order = _stack_images([s["images"] for s in samples])
    pixel_values = {m: v.to(device) for m, v in pixel_values.items()}
    feats = model.image_features(pixel_values, order) if order else []
    tokenised = {o: encoder.answer_ids(o) for o in {o for opts in options for o in opts}}
    out, cursor = [], 0
    for sample, opts in zip(samples, options, strict=True):
        n_img = len(sample["images"])
        mine = feats[cursor:cursor + n_img]
        cursor += n_img
        prompt = encoder.encode_prompt(sample["turns"], sample["image_tokens"])
        answers = [tokenised[o] for o in opts]
        out.append(_score_after_prompt(model, prompt, mine, answers, batch_size,
                                       encoder.tok.pad_token_id))
    return out


def _score_after_prompt(model, prompt: list[int], feats, answers: list[list[int]],
                        batch_size: int, pad_id: int) -> torch.Tensor:
    """Sum of log p(answer tokens | prompt) per answer; the prompt runs once with use_cache."""
    ids = torch.tensor([prompt], device=model.device)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                mm_encoder_outputs={"image": _pooled(feats)} if feats else None, logits_to_keep=1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,): the first answer token
    scores = [_score_chunk(model, cache, len(prompt), first, answers[i:i + batch_size], pad_id)
              for i in range(0, len(answers), batch_size)]
    return torch.cat(scores).cpu()


def _score_chunk(model, cache, n_prompt: int, first: torch.Tensor, chunk: list[list[int]],
                 pad_id: int) -> torch.Tensor:
    """(B,) log-likelihoods of B right-padded answers continuing a (1, n_prompt) cache."""
    device, b = model.device, len(chunk)
    width = max(len(a) for a in chunk)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    lengths = torch.tensor([len(a) for a in chunk])
    for row, answer in enumerate(chunk):
        ids[row, :len(answer)] = torch.tensor(answer)
    ids = ids.to(device)
    total = first[ids[:, 0]]
    if width == 1:
        return total
    past = copy.deepcopy(cache)  # the forward appends to it; the prompt's cache stays whole
    past.batch_repeat_interleave(b)
    inputs = ids[:, :-1]  # (B, W-1): the last token is only ever a target
    positions = torch.arange(width - 1)
    mask = torch.cat([torch.ones(b, n_prompt, dtype=torch.long),
                      (positions[None] < lengths[:, None] - 1).long()], dim=1).to(device)
    logits = model(input_ids=inputs, attention_mask=mask, use_cache=True,
                   **{_CACHE_KWARG: past}).logits
    logp = torch.log_softmax(logits.float(), dim=-1).gather(2, ids[:, 1:, None])[..., 0]
    valid = (positions[None] < lengths[:, None] - 1).to(device)
    return total + torch.where(valid, logp, torch.zeros_like(logp)).sum(dim=1)


def _pooled(feats):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=list(feats))


class AllowedTokens(LogitsProcessor):
    """Sets every score outside ``allowed_ids`` to -inf: decoding can emit only those tokens."""

    def __init__(self, allowed_ids, vocab_size: int):
        self.allowed = torch.zeros(vocab_size, dtype=torch.bool)
        self.allowed[torch.tensor(sorted(set(allowed_ids)), dtype=torch.long)] = True

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """scores: (B, V) -> (B, V) with disallowed tokens at -inf."""
        allowed = self.allowed.to(scores.device)
        if allowed.shape[0] < scores.shape[-1]:
            allowed = torch.cat([allowed, allowed.new_zeros(scores.shape[-1] - allowed.shape[0])])
        return scores.masked_fill(~allowed[:scores.shape[-1]], float("-inf"))


_NUMERIC_PIECE = re.compile(r"\s?[0-9.]+\s?|\s")


def numeric_answer_processor(encoder: PromptEncoder, unit: str = "") -> AllowedTokens:
    """Digit-constrained decoding for a regression answer written "12.4 years": tokens made only
    of digits, '.' and spaces, the tokens of " <unit>" / "<unit>", and ``<|im_end|>``."""
    tok = encoder.tok
    allowed = {encoder.im_end}
    for token_id in range(len(tok)):
        text = tok.decode([token_id])
        if text and _NUMERIC_PIECE.fullmatch(text):
            allowed.add(token_id)
    if unit:
        for text in (unit, " " + unit):
            allowed.update(encoder.tok(text, add_special_tokens=False)["input_ids"])
    return AllowedTokens(allowed, len(tok))


@torch.no_grad()
def generate_answers(model, encoder: PromptEncoder, samples: list[dict],
                     max_new_tokens: int = 16,
                     logits_processor: LogitsProcessor | None = None) -> list[str]:
    """Greedy answers for samples (dicts with "images", "turns", "image_tokens"), left-padded batch.

    ``logits_processor`` (e.g. :func:`numeric_answer_processor`) constrains the decoded tokens.
    """
    device = model.device
    pixel_values, order = _stack_images([s["images"] for s in samples])
    pixel_values = {m: v.to(device) for m, v in pixel_values.items()}
    mm = model.encode_images(pixel_values, order) if order else None
    prompts = [encoder.encode_prompt(s["turns"], s["image_tokens"]) for s in samples]
    collate = BrainCollator(encoder.tok.pad_token_id, padding_side="left")
    batch = collate([{"input_ids": torch.tensor(p), "attention_mask": torch.ones(len(p), dtype=torch.long),
                      "images": [], "id": ""} for p in prompts])
    out = model.generate(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device), mm_encoder_outputs=mm,
                         max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=encoder.im_end, pad_token_id=encoder.tok.pad_token_id,
                         logits_processor=LogitsProcessorList([logits_processor])
                         if logits_processor is not None else None)
    new = out[:, batch["input_ids"].shape[1]:]
    return [encoder.tok.decode(row, skip_special_tokens=True).strip() for row in new]
