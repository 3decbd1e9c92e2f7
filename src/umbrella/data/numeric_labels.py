"""Soft targets for the digits of numeric answers (``training.numeric_label_smoothing``).

A regression answer such as "57 years" is trained digit by digit ("5", "7"). With one-hot
targets every wrong number is equally wrong: "56" costs as much as "17", and the last digit of a
noisy phenotype (brain age scatters by years around the age) can only be learned by remembering
each training subject. Brain-age networks train against a Gaussian soft label over age bins
instead (Peng et al., "Accurate brain age prediction with lightweight deep neural networks",
Medical Image Analysis 2021: 1-year bins, sigma 1 year), and regression-aware fine-tuning of LLMs
(Lukasik et al., ICLR 2025) likewise makes near misses cheap. This module does that at the token
level: the target number ``y`` gets a Gaussian ``N(y, sigma)`` over the numbers written in the same
form (same sign, integer digits and decimals), and each digit position gets the marginal of that
distribution over its ten digits, given the digits before it (teacher forcing keeps the true
prefix)::

    q_k(d) ∝ Σ_{m : digits(m)[:k] = digits(y)[:k], digits(m)[k] = d} exp(-(m - y)² / 2 sigma²)

The model's factorised distribution over the digits is then fitted to that Gaussian by the
ordinary cross-entropy with soft targets (:func:`umbrella.training.trainer.unified_loss`).

``sigma`` is a fraction of each task's spread: ``smoothing * sd`` of the task's training answers
(e.g. 0.1 x 13 years = 1.3 years for ages 40-85), so one setting serves ages, scores and indices
alike. Answers whose number the tokenizer does not write one digit per token keep one-hot targets.

``training.numeric_ev_loss`` (weight w > 0) adds the squared error of the number the digit
distributions expect, as regression-aware fine-tuning does (Lukasik et al., ICLR 2025), here on
the teacher-forced digit marginals: with p_k the model's distribution over digit k given the true
digits before it, the expected answer is ``sum_k place_k * E_p_k[d]`` (place 10, 1, 0.1, ...; the
sign's), and the term is ``w * ((expected - y) / sd)^2`` per answer, sd the task's training
spread. Unlike the cross-entropy, it costs a far miss more than a near one, so the vision side
gets a gradient in proportion to how wrong the number is. Without smoothing the digits keep
one-hot cross-entropy targets.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from umbrella.data.prompts import IGNORE_INDEX
from umbrella.data.records import Record

NUMBER = re.compile(r"\s*(-?)(\d+)(?:\.(\d+))?")
MAX_CANDIDATES = 20001  # numbers within +-6 sigma of the target, at most


def answer_number(rec: Record) -> str | None:
    """The number a record's last answer starts with, as written ("57", "-1.25"), or None."""
    answers = [t for t in rec.turns if t.role == "assistant"]
    if not answers:
        return None
    match = NUMBER.match(answers[-1].text)
    return match.group(0).strip() if match else None


class NumericLabels:
    """Per-task soft digit targets for the answers of regression records.

    ``smoothing`` (> 0) times the standard deviation of a task's training answers is its sigma;
    tasks whose training answers are not numbers (classification) or do not vary get none.
    """

    def __init__(self, tokenizer, train_records: Sequence[Record], smoothing: float,
                 ev_weight: float = 0.0):
        if not (smoothing >= 0 and ev_weight >= 0 and smoothing + ev_weight > 0):
            raise ValueError(f"numeric_label_smoothing ({smoothing!r}) and numeric_ev_loss "
                             f"({ev_weight!r}) must be >= 0, one of them > 0")
        self.smoothing, self.ev_weight = float(smoothing), float(ev_weight)
        self.digit_ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
        unk = getattr(tokenizer, "unk_token_id", None)
        self.usable = len(set(self.digit_ids)) == 10 and unk not in self.digit_ids and \
            None not in self.digit_ids
        self.tok = tokenizer
        values: dict[str, list[float]] = {}
        for rec in train_records:
            number = answer_number(rec)
            if number is not None and rec.metadata.get("task_spec", {}).get("kind") == "regression":
                values.setdefault(rec.task, []).append(float(number))
        self.sd = {task: float(np.std(v)) for task, v in values.items()
                   if len(v) > 1 and np.std(v) > 0}
        self.sigma = {task: self.smoothing * sd for task, sd in self.sd.items()}

    def targets(self, rec: Record, labels: Sequence[int]):
        """(label positions, (n, 10) float32 digit distributions) for ``rec``'s number, or None
        (one-hot distributions without smoothing)."""
        sigma = self.sigma.get(rec.task)
        number = answer_number(rec)
        if not self.usable or sigma is None or number is None:
            return None
        positions = _digit_positions(self.tok, labels, number, self.digit_ids)
        if positions is None:
            return None
        if sigma == 0:
            digits = [int(c) for c in number if c.isdigit()]
            return positions, np.eye(10, dtype=np.float32)[digits]
        return positions, digit_distributions(number, sigma)

    def expected_value_terms(self, rec: Record) -> tuple[np.ndarray, float] | None:
        """(place value of each digit, the answer), both times sqrt(ev_weight) / sd, so that the
        loss term is (sum_k place_k E[d_k] - answer)^2; None without ``ev_weight`` or for an
        answer :meth:`targets` gives no positions for."""
        number = answer_number(rec)
        if not self.ev_weight > 0 or number is None or rec.task not in self.sd:
            return None
        match = NUMBER.fullmatch(number)
        whole, frac = match.group(2), match.group(3) or ""
        sign = -1.0 if match.group(1) else 1.0
        places = 10.0 ** np.arange(len(whole) - 1, -len(frac) - 1, -1)
        scale = math.sqrt(self.ev_weight) / self.sd[rec.task]
        return (sign * scale * places).astype(np.float32), float(number) * scale


def _digit_positions(tok, labels: Sequence[int], number: str, digit_ids: list[int]):
    """Positions of ``number``'s digits among the first labelled tokens (the answer), or None when
    the answer does not start with the number written one character per token."""
    start = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), None)
    if start is None:
        return None
    positions = []
    for i, ch in enumerate(number, start):
        if i >= len(labels) or labels[i] == IGNORE_INDEX:
            return None
        if ch.isdigit():
            if labels[i] != digit_ids[int(ch)]:
                return None
            positions.append(i)
        elif tok.convert_ids_to_tokens(int(labels[i])).lstrip("\u0120\u2581 ") != ch:
            return None  # '.' or '-' (byte-level / SentencePiece word marks stripped)
    return positions


def digit_distributions(number: str, sigma: float) -> np.ndarray:
    """(n_digits, 10): the marginal of N(y, sigma) over each digit of ``number`` given the digits
    before it, over the numbers written like ``number`` (same sign, integer digits, decimals)."""
    match = NUMBER.fullmatch(number)
    if match is None:
        raise ValueError(f"not a plain decimal number: {number!r}")
    whole, frac = match.group(2), match.group(3) or ""  # the sign keeps its one-hot target
    decimals, n_int = len(frac), len(whole)
    scale = 10 ** decimals
    target = int(whole + frac)  # the number in units of its last digit, without sign
    width = min(int(math.ceil(6 * sigma * scale)), MAX_CANDIDATES // 2)
    # a leading zero is only written for a one-digit integer part; a negative target's
    # candidates are its magnitudes
    lo = max(target - width, 10 ** (n_int - 1 + decimals) if n_int > 1 else 0)
    hi = min(target + width, 10 ** (n_int + decimals) - 1)
    cand = np.arange(lo, hi + 1, dtype=np.int64)
    weight = np.exp(-0.5 * ((cand - target) / (sigma * scale)) ** 2)
    n_digits = n_int + decimals
    digits = (cand[:, None] // 10 ** np.arange(n_digits - 1, -1, -1)[None, :]) % 10
    true = digits[cand == target][0]
    out = np.zeros((n_digits, 10), dtype=np.float64)
    prefix = np.ones(len(cand), dtype=bool)
    for k in range(n_digits):
        out[k] = np.bincount(digits[prefix, k], weights=weight[prefix], minlength=10)
        out[k] /= out[k].sum()  # > 0: the target itself (weight 1) keeps the true prefix
        prefix &= digits[:, k] == true[k]
    return out.astype(np.float32)
