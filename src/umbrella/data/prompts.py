"""Conversation -> token ids and labels (ChatML), with ``<image>`` expanded to N visual tokens.

Layout of one conversation (``|`` separates segments that are tokenised on their own)::

    <|im_start|> | user\\n | text <image>*N text | <|im_end|> | \\n
    <|im_start|> | assistant\\n | answer | <|im_end|> | \\n

Labels are -100 everywhere except the assistant answers and their ``<|im_end|>``: the model learns
the answer and when to stop. Every segment is tokenised alone, so the same prompt gives the same ids
at training, scoring and generation time.
"""

from __future__ import annotations

from dataclasses import dataclass

from umbrella.data.records import IMAGE_PLACEHOLDER, Turn
from umbrella.data.tokenizer import IM_END, IM_START
from umbrella.errors import ModelError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


class PromptEncoder:
    """Encodes turns with a tokenizer; ``image_tokens[i]`` is the token count of the i-th image."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.im_start = tokenizer.convert_tokens_to_ids(IM_START)
        self.im_end = tokenizer.convert_tokens_to_ids(IM_END)
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        self.newline = self._text("\n")

    def _text(self, text: str) -> list[int]:
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
        return [self.im_start] + self._text(f"{role}\n")

    def answer_ids(self, text: str) -> list[int]:
        """The ids an assistant answer is scored or trained on: the answer then <|im_end|>."""
        return self._text(text) + [self.im_end]

    def encode(self, turns: tuple[Turn, ...] | list[Turn], image_tokens: list[int],
               add_generation_prompt: bool = False) -> Encoded:
        """All turns; with ``add_generation_prompt`` an open assistant header is appended."""
        ids, labels, used = [], [], 0
        for turn in turns:
            n_img = turn.text.count(IMAGE_PLACEHOLDER)
            head = self.header(turn.role)
            if turn.role == "assistant":
                body = self.answer_ids(turn.text)
                ids += head + body + self.newline
                labels += [IGNORE_INDEX] * len(head) + body + [IGNORE_INDEX] * len(self.newline)
                continue
            body = self._user_body(turn.text, image_tokens[used:used + n_img])
            used += n_img
            body += [self.im_end] + self.newline
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
