"""Conversation -> token ids and labels, with ``<image>`` expanded to N visual tokens.

Layout of one conversation (``|`` separates segments that are tokenised on their own)::

    <|im_start|> | user\\n | text <image>*N text | <|im_end|> | \\n
    <|im_start|> | assistant\\n | answer | <|im_end|> | \\n

That is ChatML (Qwen, and the offline tokenizer); LLaVA-1.5's Vicuna layout is ``VICUNA`` below.
Labels are -100 everywhere except the assistant answers and their end token: the model learns
the answer and when to stop. Every segment is tokenised alone, so the same prompt gives the same ids
at training, scoring and generation time.
"""

from __future__ import annotations

from dataclasses import dataclass

from umbrella.data.records import IMAGE_PLACEHOLDER, Turn
from umbrella.data.tokenizer import CHATML_TEMPLATE, IM_END, IM_START
from umbrella.errors import ModelError

IGNORE_INDEX = -100

VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")

VICUNA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
    "{% else %}{{ '" + VICUNA_SYSTEM.replace("'", "\\'") + " ' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    """How one base LLM family lays out a conversation, as text segments tokenised on their own.

    A user turn is ``user_header + text + user_end``; an answer is ``assistant_header`` then
    ``answer_prefix + text`` then ``end_token`` (trained on, and stops generation) then
    ``after_answer``. ``system`` is written once before the first turn.
    """

    name: str
    system: str
    user_header: str
    user_end: str
    assistant_header: str
    answer_prefix: str
    end_token: str
    after_answer: str
    template: str  # the tokenizer's chat template, for messages whose content is a string
    bos: bool = False  # start every sequence with the tokenizer's BOS (LLaVA-1.5 was trained so)


CHATML = ChatFormat("chatml", system="", user_header=f"{IM_START}user\n", user_end=f"{IM_END}\n",
                    assistant_header=f"{IM_START}assistant\n", answer_prefix="", end_token=IM_END,
                    after_answer="\n", template=CHATML_TEMPLATE)
# LLaVA-1.5 (conv_vicuna_v1): "<system> USER: <image>\nQ ASSISTANT: A</s>USER: ..."
VICUNA = ChatFormat("vicuna", system=VICUNA_SYSTEM + " ", user_header="USER: ", user_end=" ",
                    assistant_header="ASSISTANT:", answer_prefix=" ", end_token="</s>",
                    after_answer="", template=VICUNA_TEMPLATE, bos=True)
CHAT_FORMATS = {f.name: f for f in (CHATML, VICUNA)}


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


class PromptEncoder:
    """Encodes turns with a tokenizer in a chat format (ChatML by default, or Vicuna for LLaVA-1.5).

    ``image_tokens[i]`` is the token count of the i-th image. Every segment of the format is
    tokenised on its own; a SentencePiece tokenizer (Llama) adds a word-boundary space in front of
    each piece itself, so one leading space is stripped from segments for it.
    """

    def __init__(self, tokenizer, fmt: ChatFormat | None = None):
        self.tok, self.fmt = tokenizer, fmt or detect_format(tokenizer)
        self.end_id = tokenizer.convert_tokens_to_ids(self.fmt.end_token)
        self.im_end = self.end_id  # the token that ends an answer and stops generation
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        self.sentencepiece = _adds_prefix_space(tokenizer)
        self.newline = self._text("\n")

    def _text(self, text: str) -> list[int]:
        if self.sentencepiece and text.startswith(" "):
            text = text[1:]
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def _user_body(self, text: str, image_tokens: list[int]) -> list[int]:
        pieces = text.split(IMAGE_PLACEHOLDER)
        if len(pieces) - 1 != len(image_tokens):
            raise ModelError(f"{len(pieces) - 1} <image> placeholders but token counts for "
                             f"{len(image_tokens)} images")
        ids = self._text(pieces[0])
        for n, piece in zip(image_tokens, pieces[1:], strict=True):
            ids += [self.image_id] * n + self._text(piece)
        return ids

    def header(self, role: str) -> list[int]:
        if role == "assistant":
            return self._text(self.fmt.assistant_header)
        if role == "system":
            return self._text(f"{IM_START}system\n") if self.fmt.name == "chatml" else []
        return self._text(self.fmt.user_header)

    def answer_ids(self, text: str) -> list[int]:
        """The ids an assistant answer is scored or trained on: the answer then the end token."""
        return self._text(self.fmt.answer_prefix + text) + [self.end_id]

    def _start(self, turns) -> list[int]:
        ids = [self.tok.bos_token_id] if self.fmt.bos and self.tok.bos_token_id is not None else []
        if self.fmt.system and not any(t.role == "system" for t in turns):
            ids += self._text(self.fmt.system)
        return ids

    def encode(self, turns: tuple[Turn, ...] | list[Turn], image_tokens: list[int],
               add_generation_prompt: bool = False) -> Encoded:
        """All turns; with ``add_generation_prompt`` an open assistant header is appended."""
        ids = self._start(turns)
        labels, used = [IGNORE_INDEX] * len(ids), 0
        after = self._text(self.fmt.after_answer)
        for turn in turns:
            n_img = turn.text.count(IMAGE_PLACEHOLDER)
            head = self.header(turn.role)
            if turn.role == "assistant":
                body = self.answer_ids(turn.text)
                ids += head + body + after
                labels += [IGNORE_INDEX] * len(head) + body + [IGNORE_INDEX] * len(after)
                continue
            body = self._user_body(turn.text, image_tokens[used:used + n_img])
            used += n_img
            body += self._text(self.fmt.user_end)
            ids += head + body
            labels += [IGNORE_INDEX] * (len(head) + len(body))
        if used != len(image_tokens):
            raise ModelError(f"{used} <image> placeholders but {len(image_tokens)} images")
        if add_generation_prompt:
            head = self.header("assistant")
            ids += head
            labels += [IGNORE_INDEX] * len(head)
        return Encoded(ids, labels)

    def encode_prompt(self, turns, image_tokens: list[int]) -> list[int]:
        """Everything before the last assistant answer, ending with an open assistant header."""
        last = max(i for i, t in enumerate(turns) if t.role == "assistant")
        return self.encode(list(turns[:last]), image_tokens, add_generation_prompt=True).input_ids


def detect_format(tokenizer) -> ChatFormat:
    """ChatML when the tokenizer knows <|im_start|>/<|im_end|>; Vicuna when its EOS is </s>."""
    vocab = tokenizer.get_vocab()
    if IM_START in vocab and IM_END in vocab:
        return CHATML
    if tokenizer.eos_token == VICUNA.end_token:
        return VICUNA
    raise ModelError(f"cannot tell the chat format of this tokenizer (no {IM_START}/{IM_END}, "
                     f"end token {tokenizer.eos_token!r}); use a ChatML or Vicuna tokenizer")


def _adds_prefix_space(tokenizer) -> bool:
    """True for SentencePiece tokenizers that put a word-boundary marker on every piece."""
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(ids) and tokenizer.convert_ids_to_tokens(ids[0]).startswith("\u2581")
