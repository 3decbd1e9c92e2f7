import pytest

from umbrella.data.prompts import IGNORE_INDEX, PromptEncoder
from umbrella.data.records import Turn
from umbrella.data.tokenizer import train_tokenizer
from umbrella.errors import ModelError


@pytest.fixture(scope="module")
def encoder():
    return PromptEncoder(train_tokenizer(["What is the sex of this subject? male female"] * 4, 300))


def test_image_expansion_count(encoder):
    enc = encoder.encode([Turn("user", "<image>\n<image>\nCompare."), Turn("assistant", "male")],
                         [216, 27])
    assert enc.input_ids.count(encoder.image_id) == 243
    first = enc.input_ids.index(encoder.image_id)
    assert enc.input_ids[first:first + 216] == [encoder.image_id] * 216


def test_labels_cover_exactly_the_answers_and_their_end(encoder):
    turns = [Turn("user", "<image>\nWhat is the sex of this subject?"), Turn("assistant", "male"),
             Turn("user", "Sure?"), Turn("assistant", "female")]
    enc = encoder.encode(turns, [8])
    assert len(enc.labels) == len(enc.input_ids)
    learned = [i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX]
    ids = enc.input_ids
    male, female = encoder.answer_ids("male"), encoder.answer_ids("female")
    # both answers appear right after an assistant header, and only they are learned
    head = encoder.header("assistant")
    starts = [i + len(head) for i in range(len(ids)) if ids[i:i + len(head)] == head]
    expected = list(range(starts[0], starts[0] + len(male))) + \
        list(range(starts[1], starts[1] + len(female)))
    assert learned == expected
    assert [ids[i] for i in expected] == male + female
    assert male[-1] == encoder.im_end and female[-1] == encoder.im_end
    assert all(enc.labels[i] == ids[i] for i in learned)


def test_prompt_ends_with_open_assistant_header(encoder):
    turns = [Turn("user", "<image>\nQ?"), Turn("assistant", "male")]
    prompt = encoder.encode_prompt(turns, [4])
    full = encoder.encode(turns, [4]).input_ids
    assert full[:len(prompt)] == prompt
    assert prompt[-len(encoder.header("assistant")):] == encoder.header("assistant")
    assert full[len(prompt):len(prompt) + 2] == encoder.answer_ids("male")


def test_placeholder_count_mismatch(encoder):
    with pytest.raises(ModelError, match="1 <image> placeholders but 2"):
        encoder.encode([Turn("user", "<image>\nQ"), Turn("assistant", "a")], [4, 4])


def test_chat_template_matches_segment_text(encoder):
    text = encoder.tok.apply_chat_template(
        [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "male"}], tokenize=False)
    assert text == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nmale<|im_end|>\n"
    ids = encoder.encode([Turn("user", "Q?"), Turn("assistant", "male")], []).input_ids
    assert encoder.tok.decode(ids) == text


def test_numbers_are_tokenised_digit_by_digit_however_frequent():
    tok = train_tokenizer(["28.5 years"] * 50 + ["77.0 years"] * 50 + ["52.3 years"], 300)
    for text, digits in (("28.5 years", "285"), ("52.3 years", "523"), ("77.0 years", "770")):
        pieces = tok.tokenize(text)
        assert [p for p in pieces if p.isdigit()] == list(digits), pieces
        assert tok.decode(tok(text)["input_ids"]) == text
