"""Soft digit targets for numeric answers: the marginals of a Gaussian, found at the right label
positions, scored by the loss exactly as one-hot cross-entropy when they are one-hot."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from umbrella.data.collate import BrainCollator
from umbrella.data.numeric_labels import NumericLabels, digit_distributions
from umbrella.data.prompts import IGNORE_INDEX, PromptEncoder
from umbrella.data.records import Record, Turn
from umbrella.data.tokenizer import train_tokenizer
from umbrella.training.trainer import soft_target_loss


def _gauss_marginals(number: str, sigma: float, lo: int, hi: int, scale: int) -> np.ndarray:
    """Brute force over every number written with the same digits count: the first digit's
    marginal and the second's given the true first digit."""
    target = round(float(number) * scale)
    cand = np.arange(lo, hi + 1)
    w = np.exp(-0.5 * ((cand - target) / (sigma * scale)) ** 2)
    n = len(number.replace(".", ""))
    digits = np.array([[int(c) for c in f"{m:0{n}d}"] for m in cand])
    first = np.bincount(digits[:, 0], weights=w, minlength=10)
    same = digits[:, 0] == digits[cand == target][0, 0]
    second = np.bincount(digits[same, 1], weights=w[same], minlength=10)
    return np.stack([first / first.sum(), second / second.sum()])


@pytest.mark.parametrize("number,sigma,lo,hi,scale", [("57", 1.3, 10, 99, 1),
                                                      ("40", 2.5, 10, 99, 1),
                                                      ("5.3", 0.4, 0, 99, 10)])
def test_digit_distributions_are_the_gaussian_marginals(number, sigma, lo, hi, scale):
    got = digit_distributions(number, sigma)
    assert got.shape == (len(number.replace(".", "")), 10)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(got[:2], _gauss_marginals(number, sigma, lo, hi, scale), atol=1e-5)


def test_a_tiny_sigma_gives_one_hot_digits():
    got = digit_distributions("62.5", 1e-4)
    np.testing.assert_array_equal(got.argmax(1), [6, 2, 5])
    np.testing.assert_allclose(got.max(1), 1.0)


def test_near_misses_get_the_mass_far_ones_do_not():
    units = digit_distributions("57", 1.3)[1]
    assert units[7] > units[6] > units[4] > units[2]
    assert units[6] == pytest.approx(units[8], rel=1e-6)


def _record(answer: str, task: str = "age", kind: str = "regression", split: str = "train"):
    return Record(id=f"s{answer}_{task}", images=(), subject_id=f"s{answer}", task=task, split=split,
                  turns=(Turn("user", "How old is this subject?"), Turn("assistant", answer)),
                  metadata={"task_spec": {"kind": kind}})


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["How old is this subject? 57 years 41 years 83.5 years male"] * 4, 300)


def test_targets_sit_on_the_answer_digits_and_scale_with_the_task_spread(tokenizer):
    train = [_record(f"{a} years") for a in (41, 57, 63, 83)] + [_record("male", "sex", "classification")]
    numeric = NumericLabels(tokenizer, train, smoothing=0.1)
    assert set(numeric.sigma) == {"age"}
    assert numeric.sigma["age"] == pytest.approx(0.1 * np.std([41, 57, 63, 83]))
    encoder = PromptEncoder(tokenizer)
    rec = _record("57 years", split="val")
    labels = encoder.encode(rec.turns, []).labels
    positions, weights = numeric.targets(rec, labels)
    assert [labels[p] for p in positions] == [tokenizer.convert_tokens_to_ids(c) for c in "57"]
    assert positions[0] == next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    np.testing.assert_allclose(weights, digit_distributions("57", numeric.sigma["age"]))
    assert numeric.targets(_record("male", "sex", "classification"), labels) is None


def test_decimal_answers_skip_the_point(tokenizer):
    numeric = NumericLabels(tokenizer, [_record(f"{a} years") for a in ("41.0", "83.5")], 0.1)
    encoder = PromptEncoder(tokenizer)
    rec = _record("83.5 years")
    labels = encoder.encode(rec.turns, []).labels
    positions, weights = numeric.targets(rec, labels)
    assert [tokenizer.convert_ids_to_tokens(labels[p]) for p in positions] == ["8", "3", "5"]
    assert weights.shape == (3, 10)


def test_soft_loss_equals_cross_entropy_for_one_hot_targets_and_differs_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 20)
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 3:6] = torch.tensor([4, 5, 7])
    labels[1, 2:5] = torch.tensor([6, 4, 7])
    token_ids = torch.arange(4, 14)  # "digits" are tokens 4..13
    index = torch.tensor([[0, 3], [0, 4], [1, 3]])
    one_hot = F.one_hot(labels[index[:, 0], index[:, 1]] - 4, 10).float()
    hard = F.cross_entropy(logits[:, :-1].reshape(-1, 20), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)
    got = soft_target_loss(logits, labels, index, one_hot, token_ids)
    assert got.item() == pytest.approx(hard.item(), rel=1e-6)
    smooth = torch.full((3, 10), 0.1)
    other = soft_target_loss(logits, labels, index, smooth, token_ids)
    assert other.item() != pytest.approx(hard.item(), rel=1e-3)
    # the count divides the sum, as transformers does under gradient accumulation
    assert soft_target_loss(logits, labels, index, one_hot, token_ids, num_items_in_batch=12).item() \
        == pytest.approx(hard.item() * 6 / 12, rel=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_moves_soft_positions_with_the_padding(side):
    collate = BrainCollator(0, padding_side=side)
    def sample(n, positions):
        ids = torch.arange(1, n + 1)
        s = {"images": [], "input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": ids.clone(), "id": str(n)}
        if positions:
            s |= {"soft_positions": torch.tensor(positions), "soft_weights": torch.eye(10)[:len(positions)],
                  "soft_token_ids": torch.arange(10)}
        return s
    batch = collate([sample(5, [2, 3]), sample(8, []), sample(3, [1])])
    rows, cols = batch["soft_index"].T.tolist()
    assert rows == [0, 0, 2]
    for r, c, orig in zip(rows, cols, [3, 4, 2], strict=True):  # the same token after padding
        assert batch["labels"][r, c].item() == orig


def test_smoothing_without_regression_records_is_a_config_error(tiny_config):
    from umbrella.errors import ConfigError
    from umbrella.training.run import train

    with pytest.raises(ConfigError, match="numeric_label_smoothing"):
        train(tiny_config("training.numeric_label_smoothing=0.1", "training.max_steps=1"),
              progress=False)


def test_expected_value_loss_of_a_known_digit_distribution():
    """Tens digit certainly 5, units uniform over 0-9: the expected number is 54.5; the term is
    the squared miss of 57 in the scaled units, and it falls as the units move towards 7."""
    from umbrella.training.trainer import expected_value_loss

    logits = torch.zeros(1, 4, 20)
    token_ids = torch.arange(4, 14)
    logits[0, 1, 4 + 5] = 50.0  # label position 2 (tens) is predicted at 1: "5" certain
    index = torch.tensor([[0, 2], [0, 3]])  # units at label position 3: all digits equal
    scale = 0.5
    place, value = torch.tensor([10.0, 1.0]) * scale, torch.full((2,), 57.0 * scale)
    got = expected_value_loss(logits, index, token_ids, place, value)
    assert got.item() == pytest.approx((scale * (54.5 - 57)) ** 2, rel=1e-5)
    logits[0, 2, 4 + 7] = 3.0  # more mass on "7": closer
    assert expected_value_loss(logits, index, token_ids, place, value) < got
    # two answers in a batch: the mean of their terms; a non-digit token's logit is ignored
    logits2 = torch.zeros(2, 4, 20)
    logits2[:, 1, 4 + 5] = 50.0
    logits2[1, 2, 0] = 100.0
    index2 = torch.tensor([[0, 2], [0, 3], [1, 2], [1, 3]])
    both = expected_value_loss(logits2, index2, token_ids, place.repeat(2),
                               torch.tensor([57.0, 57.0, 50.0, 50.0]) * scale)
    expected = ((scale * 2.5) ** 2 + (scale * 4.5) ** 2) / 2
    assert both.item() == pytest.approx(expected, rel=1e-5)


def test_expected_value_terms_scale_by_weight_and_spread(tokenizer):
    train = [_record(f"{a} years") for a in (41, 57, 63, 83)]
    numeric = NumericLabels(tokenizer, train, smoothing=0.0, ev_weight=4.0)
    sd = np.std([41, 57, 63, 83])
    places, answer = numeric.expected_value_terms(_record("57 years"))
    np.testing.assert_allclose(places, np.array([10.0, 1.0]) * 2 / sd, rtol=1e-6)
    assert answer == pytest.approx(57 * 2 / sd)
    places, answer = numeric.expected_value_terms(_record("83.5 years"))
    np.testing.assert_allclose(places, np.array([10.0, 1.0, 0.1]) * 2 / sd, rtol=1e-6)
    # without smoothing the digits keep one-hot targets
    rec = _record("57 years", split="val")
    positions, weights = numeric.targets(rec, PromptEncoder(tokenizer).encode(rec.turns, []).labels)
    np.testing.assert_array_equal(weights, np.eye(10)[[5, 7]])
    assert NumericLabels(tokenizer, train, 0.1).expected_value_terms(_record("57 years")) is None
    with pytest.raises(ValueError, match="one of them > 0"):
        NumericLabels(tokenizer, train, 0.0)


def test_the_expected_value_term_refuses_bad_weights_and_records_without_numbers(tiny_config):
    from umbrella.errors import ConfigError
    from umbrella.training.run import train

    with pytest.raises(ConfigError, match="numeric_ev_loss"):  # the tiny cohort asks sex only
        train(tiny_config("training.numeric_ev_loss=1.0", "training.max_steps=1"), progress=False)
    with pytest.raises(ConfigError, match="numeric_ev_loss.*must be >= 0"):
        train(tiny_config("training.numeric_ev_loss=-1", "training.max_steps=1"), progress=False)
    with pytest.raises(ConfigError, match="numeric_label_smoothing.*must be >= 0"):
        train(tiny_config("training.numeric_label_smoothing=-0.1", "training.max_steps=1"),
              progress=False)
