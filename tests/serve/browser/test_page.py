"""The page in a real browser: Debian's Chromium driven by playwright-core (no browser download).

A uvicorn server with the tiny model and its evaluation runs in a thread; ``page_check.mjs``
opens the first subject of the evaluation table, screenshots the viewer, asks the chat's
question, asks an off-task one, shows the model's input and uploads a scan. Skips, saying why,
when Chromium, node or the npm packages are missing (`make test` installs them).
Set UMBRELLA_SCREENSHOT=path to keep the page screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

HERE = Path(__file__).parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def _missing() -> str | None:
    if not Path(CHROMIUM).is_file():
        return (f"no Chromium at {CHROMIUM}: install Debian's `chromium` package (as root: "
                "apt-get install -y chromium) or set CHROMIUM=/path/to/chromium")
    if shutil.which("node") is None:
        return "node is not installed (the browser test runs a node script)"
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed: run `npm ci` in tests/serve/browser (make test does)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(served_run):
    import uvicorn

    from umbrella.serve.app import create_app

    app = create_app(served_run.run_dir, eval_dir=served_run.eval_dir,
                     data_roots={"T1": served_run.data_root})
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield app, f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(timeout=10)


def _blank(png: Path) -> tuple[float, float]:
    """(std of the grey levels, fraction of pixels brighter than the darkest 5%)."""
    grey = mpimg.imread(png)[..., :3].mean(axis=2)
    return float(grey.std()), float((grey > np.percentile(grey, 5) + 0.05).mean())


def test_page_in_chromium(server, served_run, tmp_path):
    app, url = server
    upload = served_run.data_root / "images" / "sub-0002_T1w.nii.gz"
    done = subprocess.run(["node", str(HERE / "page_check.mjs"), url, str(tmp_path), str(upload)],
                          capture_output=True, text=True, timeout=300, cwd=HERE)
    assert done.stdout.strip(), done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0 and "error" not in report, (report, done.stderr[-2000:])
    assert report["console_errors"] == []

    # the viewer drew the scan: the canvas is not blank
    std, lit = _blank(tmp_path / "canvas.png")
    assert std > 0.05 and lit > 0.05, (std, lit)
    # the model-input overlay changed the picture
    before = mpimg.imread(tmp_path / "canvas.png")
    after = mpimg.imread(tmp_path / "canvas_input.png")
    assert before.shape == after.shape and np.abs(before - after).mean() > 0.005

    # the evaluation row opened that record's subject
    rows = app.state.umbrella.evaluation.rows
    assert report["eval_rows"] == len(rows) and report["opened_record"] == rows[0]["id"]
    subject = rows[0]["subject_id"]
    assert f"{subject}_T1w.nii.gz" in report["scan_name"]

    # the chat got the model's answer for that subject, with the option bars
    scan = served_run.data_root / "images" / f"{subject}_T1w.nii.gz"
    expected = app.state.umbrella.assistant.answer(report["question"], [("T1", scan)])
    assert report["answer"] == expected.text
    assert report["bars"] == 2 and [t.split()[0] for t in report["bar_texts"]] == ["male",
                                                                                  "female"]
    assert "not trained" in report["off_task_notice"]
    assert "sex" in report["tasks_text"]
    assert "sub-0002_T1w.nii.gz" in report["uploaded_name"]

    page = tmp_path / "page.png"
    assert page.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("UMBRELLA_SCREENSHOT"):
        shutil.copy(page, os.environ["UMBRELLA_SCREENSHOT"])
