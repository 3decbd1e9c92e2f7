"""The offline tokenizer: a byte-level BPE trained on the records' text, with a ChatML template.

Special tokens: ``<|pad|>`` (id 0), ``<image>``, ``<|im_start|>``, ``<|im_end|>`` (also EOS).
Byte-level means any text can be encoded, including words never seen while training. Digits are
always single tokens (as in the Llama and Qwen tokenizers): otherwise BPE merges frequent numbers
("28", "77") into tokens of their own while rarer ones stay split, and a regression answer such as
"52.3 years" becomes a choice among many rarely seen number tokens instead of digit by digit.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from umbrella.data.records import IMAGE_PLACEHOLDER, Record

PAD, IM_START, IM_END = "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, IMAGE_PLACEHOLDER, IM_START, IM_END)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Text always seen by the tokenizer besides the records: role headers and common answer pieces.
_SEED_TEXT = ["system\n", "user\n", "assistant\n", "0123456789 . years", "yes no"]


def record_texts(records: Iterable[Record]) -> Iterable[str]:
    for rec in records:
        for turn in rec.turns:
            yield turn.text.replace(IMAGE_PLACEHOLDER, " ")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a transformers fast tokenizer."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(list(_SEED_TEXT) + list(texts), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD, eos_token=IM_END,
                                  extra_special_tokens=[IMAGE_PLACEHOLDER, IM_START])
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "right"
    return tok


def image_token_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
