"""The round trip through a real Label Studio server (slow; needs a separate venv).

Label Studio pins many packages, so it never goes into the project's venv. Create its own once:

    python3 -m venv /work/venv-ls && /work/venv-ls/bin/pip install label-studio

(or point ``FMPIPE_LABEL_STUDIO`` at another ``label-studio`` executable). The test skips when
neither exists. It starts a local server on a free port with a throw-away data directory,
creates a project with the review's ``label_config.xml``, imports ``label_studio_tasks.json``
through the API, annotates some tasks through the API (one cancelled), exports the project
as JSON, then ``fmpipe review import`` + ``fmpipe annotate`` apply it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import make_model, run_data_steps

LS = os.environ.get("FMPIPE_LABEL_STUDIO", "/work/venv-ls/bin/label-studio")
TOKEN = "fmpipe-test-token-0123456789"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(LS).exists(), reason=f"no Label Studio at {LS} (see this module's docstring)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, base: str) -> None:
        self.base = base

    def call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None


@pytest.fixture
def label_studio(tmp_path):
    port = free_port()
    env = {**os.environ, "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true", "DJANGO_DB": "sqlite",
           "LABEL_STUDIO_BASE_DATA_DIR": str(tmp_path / "ls-data")}
    log = open(tmp_path / "ls.log", "w")
    proc = subprocess.Popen(
        [LS, "start", "--no-browser", "--port", str(port), "--host", f"http://127.0.0.1:{port}",
         "--data-dir", str(tmp_path / "ls-data"), "--username", "reviewer@example.org",
         "--password", "fmpipe-test-pass", "--user-token", TOKEN, "--enable-legacy-api-token"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    client = Client(f"http://127.0.0.1:{port}")
    deadline = time.time() + 600  # first start migrates a fresh database: minutes on a busy machine
    try:
        while True:
            try:
                client.call("GET", "/api/projects")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"Label Studio did not come up: {(tmp_path / 'ls.log').read_text()[-2000:]}")
                time.sleep(3)
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_round_trip_through_label_studio(project, label_studio):
    from pipeline.runner import run_step

    run_data_steps("digits", "collect", "clean", "validate", "annotate")
    make_model("digits", epochs=2)
    run_step("review", "digits")
    out = project / "data/digits/review"
    tasks = json.loads((out / "label_studio_tasks.json").read_text())[:8]

    ls = label_studio
    created = ls.call("POST", "/api/projects", {"title": "fmpipe digits review",
                                                "label_config": (out / "label_config.xml").read_text()})
    pid = created["id"]
    ls.call("POST", f"/api/projects/{pid}/import", tasks)
    listed = ls.call("GET", f"/api/tasks?project={pid}&page_size=100&fields=all")
    listed = listed["tasks"] if isinstance(listed, dict) else listed
    assert len(listed) == len(tasks)
    by_id = {t["data"]["fmpipe_id"]: t for t in listed}
    assert all(t.get("total_predictions", 1) >= 1 for t in listed)

    answers = {}
    for i, t in enumerate(tasks[:5]):
        fid = t["data"]["fmpipe_id"]
        choice = "drop" if i == 0 else t["data"]["suggested_label"] if t["data"]["suggested_label"] != "drop" else "3"
        answers[fid] = choice
        ls.call("POST", f"/api/tasks/{by_id[fid]['id']}/annotations", {
            "result": [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [choice]}}],
            "was_cancelled": False, "lead_time": 2.5})
    cancelled_id = tasks[5]["data"]["fmpipe_id"]
    ls.call("POST", f"/api/tasks/{by_id[cancelled_id]['id']}/annotations",
            {"result": [], "was_cancelled": True, "lead_time": 1.0})

    exported = ls.call("GET", f"/api/projects/{pid}/export?exportType=JSON&download_all_tasks=true")
    export_file = project / "project-export.json"
    export_file.write_text(json.dumps(exported, indent=2))

    result = subprocess.run([sys.executable, "-m", "pipeline", "review", "import", str(export_file),
                             "--stage", "digits"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = run_step("annotate", "digits")
    assert report["dropped"] == 1 and report["cancelled_ignored"] == 1
    assert report["relabelled"] + report["confirmed"] == 4
    from pipeline.manifest import read_dataset

    m = read_dataset("data/digits/annotate").manifest.set_index("id")
    for fid, choice in answers.items():
        if choice == "drop":
            assert fid not in m.index
        else:
            assert m.at[fid, "label_name"] == choice and m.at[fid, "label_source"] == "annotation"
            assert m.at[fid, "annotator"] == "reviewer@example.org" or m.at[fid, "annotator"].startswith("label-studio-user:")
            assert m.at[fid, "decision_file"] == "annotations/digits/project-export.json"
    shutil.rmtree(project / "data/digits/review")
