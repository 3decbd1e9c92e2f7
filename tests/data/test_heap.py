"""umbrella.data.heap.long_lived: the collector is off inside and as it was after; a block that
made many objects freezes them; loading records and building a dataset give the same results
with or without the freeze (no timing asserts)."""

from __future__ import annotations

import gc
import json

import pytest

from umbrella.data import heap
from umbrella.data.heap import long_lived


@pytest.fixture(autouse=True)
def _collector_restored():
    assert gc.isenabled() and gc.get_freeze_count() == 0
    yield
    gc.unfreeze()
    gc.enable()


def test_collector_is_off_inside_and_on_after():
    with long_lived():
        assert not gc.isenabled()
        kept = [[i] for i in range(100)]
    assert gc.isenabled() and gc.get_freeze_count() == 0  # below the threshold: nothing frozen
    assert len(kept) == 100


def test_many_objects_are_frozen():
    with long_lived(freeze_min=1000):
        kept = [[i] for i in range(5000)]
    assert gc.isenabled() and gc.get_freeze_count() >= 5000
    assert kept[-1] == [4999]


def test_error_inside_enables_the_collector_and_freezes_nothing():
    with pytest.raises(ValueError):
        with long_lived(freeze_min=10):
            _ = [[i] for i in range(1000)]
            raise ValueError("bad record")
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_nested_blocks_defer_to_the_outermost():
    with long_lived(freeze_min=1000):
        with long_lived(freeze_min=10):
            kept = [[i] for i in range(500)]
        assert not gc.isenabled() and gc.get_freeze_count() == 0
        kept += [[i] for i in range(1000)]
    assert gc.isenabled() and gc.get_freeze_count() >= 1500


def test_collector_already_off_is_left_alone():
    gc.disable()
    with long_lived(freeze_min=10):
        kept = [[i] for i in range(1000)]
    assert not gc.isenabled() and gc.get_freeze_count() == 0
    assert len(kept) == 1000


def _write_records(path, n):
    lines = [json.dumps({
        "id": f"s{i}_sex", "subject_id": f"s{i}", "study": "X", "task": "sex",
        "split": ("train", "val", "test")[i % 3],
        "images": [{"modality": "T1", "path": f"s{i}/T1w.nii.gz"}],
        "conversations": [{"from": "human", "value": "<image>\nWhat is the sex of this subject?"},
                          {"from": "gpt", "value": ("female", "male")[i % 2]}]})
        for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_loading_and_encoding_give_the_same_results_frozen_or_not(tmp_path, monkeypatch):
    from umbrella.config import load_config
    from umbrella.data.catalog import by_split, load_config_records, modality_inputs
    from umbrella.data.dataset import InstructionDataset
    from umbrella.data.prompts import PromptEncoder
    from umbrella.data.records import load_records
    from umbrella.data.tokenizer import train_tokenizer

    records_file = _write_records(tmp_path / "r.jsonl", 60)
    cfg = load_config(None, [f"dataset.T1.records=[{records_file}]",
                             f"dataset.T1.data_root={tmp_path}", "dataset.T1.image_size=[8,8,8]",
                             "dataset.T1.patch_size=[4,4,4]"])
    encoder = PromptEncoder(train_tokenizer(["What is the sex of this subject? male female"], 300))

    def build():
        records = load_config_records(cfg)
        ds = InstructionDataset(by_split(records)["train"], encoder, modality_inputs(cfg))
        return records, [(r.id, list(e.input_ids), list(e.labels)) for r, e in
                         zip(ds.records, ds.encoded, strict=True)]

    plain_records, plain_encoded = build()
    assert gc.get_freeze_count() == 0  # 60 records: far below the threshold
    monkeypatch.setattr(heap, "FREEZE_MIN_OBJECTS", 10)
    frozen_records, frozen_encoded = build()
    assert gc.isenabled() and gc.get_freeze_count() > 0
    assert frozen_records == plain_records and frozen_encoded == plain_encoded
    assert load_records(records_file) == load_records(records_file)
    assert gc.isenabled()


def test_a_bad_records_file_leaves_the_collector_on_and_unfrozen(tmp_path, monkeypatch):
    from umbrella.data.records import load_records
    from umbrella.errors import RecordError

    path = _write_records(tmp_path / "r.jsonl", 30)
    path.write_text(path.read_text() + path.read_text().splitlines()[0] + "\n")  # duplicate id
    monkeypatch.setattr(heap, "FREEZE_MIN_OBJECTS", 10)
    with pytest.raises(RecordError, match="duplicate id"):
        load_records(path)
    assert gc.isenabled() and gc.get_freeze_count() == 0
