"""The serve API through FastAPI's TestClient, with a real tiny model."""

from __future__ import annotations

import os
import shutil
import threading
import time

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from umbrella.errors import ConfigError
from umbrella.serve.app import check_bind, create_app
from umbrella.serve.scans import read_nifti_bytes

QUESTION = "What is the sex of this subject?"
T1 = "images/sub-0001_T1w.nii.gz"


@pytest.fixture(scope="module")
def app(served_run):
    return create_app(served_run.run_dir, eval_dir=served_run.eval_dir,
                      data_roots={"T1": served_run.data_root})


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def _upload(client, path, name=None, question=QUESTION, modality="T1"):
    with open(path, "rb") as fh:
        return client.post("/api/ask/upload", data={"question": question, "modality": modality},
                           files={"file": (name or path.name, fh, "application/gzip")})


def test_info_lists_the_trained_tasks(client, served_run):
    info = client.get("/api/info").json()
    assert info["modalities"] == ["T1"] and info["evaluation"] is True
    sex = info["tasks"]["sex"]
    assert sex["kind"] == "classification" and sex["options"] == ["male", "female"]
    assert QUESTION in sex["questions"] and info["tasks_note"] is None


def test_ask_with_upload_and_with_server_path_agree_with_the_model(client, app, served_run):
    up = _upload(client, served_run.data_root / T1)
    assert up.status_code == 200, up.text
    by_path = client.post("/api/ask", json={"question": QUESTION,
                                            "images": [{"modality": "T1", "path": T1}]})
    assert by_path.status_code == 200, by_path.text
    a, b = up.json(), by_path.json()
    direct = app.state.umbrella.assistant.ask(QUESTION, [("T1", served_run.data_root / T1)])
    assert a["answer"] == b["answer"] == direct
    assert a["task"] == "sex" and a["known"] is True and a["notice"] is None
    assert a["kind"] == "classification" and [o["option"] for o in a["options"]] == ["male",
                                                                                    "female"]
    probs = [o["prob"] for o in a["options"]]
    assert sum(probs) == pytest.approx(1.0, abs=1e-6)
    assert probs == pytest.approx([o["prob"] for o in b["options"]], abs=1e-6)
    assert a["distribution"] is None and a["scans"][0]["uploaded"] is True
    assert b["scans"][0]["name"] == T1 and b["scans"][0]["shape"] == [32, 32, 32]


def test_untrained_question_gets_a_notice(client):
    r = client.post("/api/ask", json={"question": "Is there a tumor in this scan?",
                                      "images": [{"modality": "T1", "path": T1}]}).json()
    assert r["known"] is False and r["task"] is None and r["options"] is None
    assert "not trained" in r["notice"] and "sex" in r["notice"]


def test_paths_outside_the_data_root_are_refused(served_run, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(served_run.data_root / T1, root / "ok.nii.gz")
    outside = tmp_path / "outside.nii.gz"
    shutil.copy(served_run.data_root / T1, outside)
    os.symlink(outside, root / "escape.nii.gz")
    (root / "sub").mkdir()
    os.symlink(tmp_path, root / "sub" / "up")
    app = create_app(served_run.model_dir, data_roots={"T1": root})
    with TestClient(app) as c:
        def ask(path, modality="T1"):
            return c.post("/api/ask", json={"question": QUESTION,
                                            "images": [{"modality": modality, "path": path}]})
        assert ask("ok.nii.gz").status_code == 200
        for bad in ("../outside.nii.gz", "sub/../../outside.nii.gz", str(outside),
                    "escape.nii.gz", "sub/up/outside.nii.gz", "/etc/passwd"):
            r = ask(bad)
            assert r.status_code == 403, (bad, r.text)
        assert "outside the T1 data root" in ask("escape.nii.gz").json()["detail"]
        assert "'..'" in ask("../outside.nii.gz").json()["detail"]
        r = ask("ok.nii.gz", modality="rsfMRI")
        assert r.status_code == 403 and "--data-root rsfMRI=DIR" in r.json()["detail"]
        assert c.post("/api/scans/path", json={"modality": "T1", "path": "escape.nii.gz"}
                      ).status_code == 403


def test_bad_uploads_are_refused_and_removed(client, app, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    r = _upload(client, notes)
    assert r.status_code == 400 and "not a NIfTI file name" in r.json()["detail"]
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(b"\x1f\x8b" + os.urandom(300))
    r = _upload(client, fake)
    assert r.status_code == 400 and "cannot read as NIfTI" in r.json()["detail"]
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), flat)
    r = _upload(client, flat)
    assert r.status_code == 400 and "expected a 3D volume" in r.json()["detail"]
    store = app.state.umbrella.scans
    names = sorted(p.name for p in store.upload_dir.iterdir())
    assert all("fake" not in n and "flat" not in n for n in names)
    assert len(names) == sum(s.temporary for s in store._scans.values())


def test_oversized_upload_is_413_and_the_server_goes_on(served_run):
    app = create_app(served_run.model_dir, max_upload_mb=0.05)
    with TestClient(app) as c:
        big = np.random.default_rng(0).random((40, 40, 40)).astype(np.float32)  # 256 kB
        img = nib.Nifti1Image(big, np.eye(4)).to_bytes()
        r = c.post("/api/scans", data={"modality": "T1"},
                   files={"file": ("big.nii", img, "application/octet-stream")})
        assert r.status_code == 413 and "larger than 0.05 MB" in r.json()["detail"]
        assert list(app.state.umbrella.scans.upload_dir.iterdir()) == []
        assert c.get("/api/info").status_code == 200


def test_token_required_off_localhost(served_run):
    with pytest.raises(ConfigError, match="--token"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "s3cret")
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    app = create_app(served_run.model_dir, token="s3cret")
    with TestClient(app) as c:
        assert c.get("/api/info").status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/").status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/api/info", headers={"X-Umbrella-Token": "s3cret"}).status_code == 200
        assert c.get("/?token=s3cret").status_code == 200


def test_malformed_requests_are_422_and_the_server_still_answers(client):
    for body in ({}, {"question": QUESTION}, {"question": "", "scans": ["x"]},
                 {"question": QUESTION, "images": [{"modality": "CT", "path": T1}]},
                 {"question": QUESTION, "scans": ["x"], "max_new_tokens": 0}):
        assert client.post("/api/ask", json=body).status_code == 422, body
    r = client.post("/api/ask", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert client.post("/api/ask", json={"question": QUESTION, "scans": ["nope"]}
                       ).status_code == 404
    assert client.get("/api/scans/nope/original.nii.gz").status_code == 404
    r = client.post("/api/ask", json={"question": QUESTION,
                                      "images": [{"modality": "T1", "path": T1}]})
    assert r.status_code == 200 and r.json()["answer"]


def test_concurrent_asks_are_serialised_and_consistent(client, app):
    assistant = app.state.umbrella.assistant
    original, inside, overlaps = assistant.answer, [0], []

    def watched(*args, **kwargs):
        inside[0] += 1
        overlaps.append(inside[0])
        try:
            time.sleep(0.01)
            return original(*args, **kwargs)
        finally:
            inside[0] -= 1

    assistant.answer = watched
    answers, errors = [], []

    def one():
        r = client.post("/api/ask", json={"question": QUESTION,
                                          "images": [{"modality": "T1", "path": T1}]})
        (answers if r.status_code == 200 else errors).append(r.json())

    try:
        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del assistant.answer
    assert errors == [] and len(answers) == 8
    assert max(overlaps) == 1  # never two requests inside the model at once
    assert len({a["answer"] for a in answers}) == 1
    assert len({tuple(o["prob"] for o in a["options"]) for a in answers}) == 1


def test_evaluation_table_plots_and_open(client, served_run):
    ev = client.get("/api/eval").json()
    rows = ev["rows"]
    assert sorted(r["id"] for r in rows) == sorted(served_run.test_ids)
    flags = [r["correct"] for r in rows]
    assert flags == sorted(flags)  # wrong answers first
    assert all(r["reference"] in ("male", "female") and 0.5 <= r["confidence"] <= 1.0
               for r in rows)
    assert "sex" in ev["tasks"] and "accuracy" in ev["tasks"]["sex"]
    assert "confusion_sex" in ev["plots"]
    png = client.get("/api/eval/plots/confusion_sex")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    assert client.get("/api/eval/plots/..%2Fmetrics.json").status_code == 404
    opened = client.post("/api/eval/open", json={"record_id": rows[0]["id"]})
    assert opened.status_code == 200, opened.text
    scan = opened.json()["scans"][0]
    img = read_nifti_bytes(client.get(f"/api/scans/{scan['scan_id']}/original.nii.gz").content)
    subject = rows[0]["subject_id"]
    truth = nib.as_closest_canonical(nib.load(served_run.data_root / "images" /
                                              f"{subject}_T1w.nii.gz"))
    np.testing.assert_allclose(img.get_fdata(), truth.get_fdata(), rtol=1e-5, atol=1e-4)
    assert client.post("/api/eval/open", json={"record_id": "nope"}).status_code == 404


def test_model_input_view_is_what_the_model_reads(client, app, served_run):
    scan = client.post("/api/scans/path", json={"modality": "T1", "path": T1}).json()
    inp = read_nifti_bytes(client.get(f"/api/scans/{scan['scan_id']}/input.nii.gz").content)
    assistant = app.state.umbrella.assistant
    model_input = assistant.load_images([("T1", served_run.data_root / T1)])[0][1][0].numpy()
    np.testing.assert_allclose(inp.get_fdata(), model_input, rtol=1e-6, atol=1e-6)
    assert inp.shape == (32, 32, 32)


def test_tasks_unknown_for_a_model_without_tasks_json(served_run, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(served_run.model_dir, model)
    (model / "tasks.json").unlink()
    with TestClient(create_app(model, data_roots={"T1": served_run.data_root})) as c:
        info = c.get("/api/info").json()
        assert info["tasks"] is None and "tasks unknown" in info["tasks_note"]
        r = c.post("/api/ask", json={"question": QUESTION,
                                     "images": [{"modality": "T1", "path": T1}]}).json()
        assert r["known"] is None and "unknown" in r["notice"] and r["answer"]


def test_page_and_niivue_are_served_offline(client):
    page = client.get("/")
    assert page.status_code == 200 and "niivue.umd.js" in page.text
    js = client.get("/static/vendor/niivue.umd.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched online
