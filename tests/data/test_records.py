import json

import pytest

from umbrella.data.records import load_records, parse_record, record_to_llava
from umbrella.errors import RecordError

LLAVA = {
    "id": "s1_sex", "subject_id": "s1", "study": "ABCD", "task": "sex", "split": "train",
    "images": [{"modality": "T1", "path": "s1/T1w.nii.gz"}],
    "conversations": [{"from": "human", "value": "<image>\nWhat is the sex of this subject?"},
                      {"from": "gpt", "value": "female"}],
}
CHAT = {
    "id": "s1_sex", "subject_id": "s1", "study": "ABCD", "task": "sex", "split": "train",
    "messages": [
        {"role": "user", "content": [{"type": "image", "modality": "T1", "path": "s1/T1w.nii.gz"},
                                     {"type": "text", "text": "What is the sex of this subject?"}]},
        {"role": "assistant", "content": "female"}],
}


def test_both_forms_parse_to_the_same_record(tmp_path):
    roots = {"T1": tmp_path}
    a = parse_record(LLAVA, data_roots=roots)
    b = parse_record(CHAT, data_roots=roots)
    assert a == b
    assert a.images[0].path == tmp_path / "s1/T1w.nii.gz"
    assert a.answer == "female" and a.modalities == ("T1",)


def test_multi_turn_and_multi_image():
    rec = parse_record({
        "id": "pair", "subject_id": "s1+s2",
        "images": [{"modality": "T1", "path": "/a.nii.gz"}, {"modality": "T1", "path": "/b.nii.gz"}],
        "conversations": [{"from": "human", "value": "<image>\n<image>\nWhich is older?"},
                          {"from": "gpt", "value": "the first"},
                          {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]})
    assert [t.role for t in rec.turns] == ["user", "assistant", "user", "assistant"]
    assert rec.answer == "yes" and len(rec.images) == 2


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("id"), "missing key 'id'"),
    (lambda r: r.pop("subject_id"), "subject_id"),
    (lambda r: r["images"][0].update(modality="PET"), "unknown modality 'PET'"),
    (lambda r: r["images"].append({"modality": "T1", "path": "x"}), "1 <image> placeholders but 2"),
    (lambda r: r["conversations"].pop(), "end with an assistant answer"),
    (lambda r: r.pop("conversations"), "conversations"),
])
def test_bad_records_name_the_record(mutate, message):
    rec = json.loads(json.dumps(LLAVA))
    mutate(rec)
    with pytest.raises(RecordError) as err:
        parse_record(rec, source="recs.jsonl", line=7)
    assert message in str(err.value)
    assert "recs.jsonl line 7" in str(err.value)


def test_jsonl_malformed_line_and_duplicates(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(LLAVA) + "\n{not json\n")
    with pytest.raises(RecordError, match=r"line 2"):
        load_records(path)
    path.write_text(json.dumps(LLAVA) + "\n" + json.dumps(LLAVA) + "\n")
    with pytest.raises(RecordError, match="duplicate id"):
        load_records(path)


def test_json_list_and_roundtrip(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([LLAVA, CHAT | {"id": "s1_b"}]))
    recs = load_records(path, {"T1": tmp_path})
    assert [r.id for r in recs] == ["s1_sex", "s1_b"]
    again = parse_record(record_to_llava(recs[1], {"T1": tmp_path}), data_roots={"T1": tmp_path})
    assert again == recs[1]
