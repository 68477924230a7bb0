"""The product as a user meets it, in subprocesses through Ray: Markdown documents completed across
two runs, the summary, a Parquet output DuckDB reads with its globs, and the contact sheet loaded in a
real (headless Chromium) browser; the README's Python API example and its `ray job submit` recipe."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb
import pytest

from tests.test_pipeline_support import REPO, image_bytes, pdf_bytes, read_rows, smoke_checkpoint

RAY = str(Path(sys.executable).with_name("ray"))
PAGEMILL = str(Path(sys.executable).with_name("pagemill"))


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.pop("RAY_ADDRESS", None)
    return e | {"PYTHONUNBUFFERED": "1"} | extra


def chromium_dom(page: Path, fragment: str, profile: Path) -> str:
    """The DOM after the page's scripts ran, as headless Chromium renders it."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed (`.ci/run` installs Debian's chromium): the contact sheet is tested "
                    "in a real browser")
    p = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                        "--virtual-time-budget=3000", "--dump-dom", f"file://{page}#{fragment}"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "<html" in p.stdout, p.stderr[-2000:]
    return p.stdout


def cards(dom: str) -> dict[str, str]:
    """data-id -> the opening tag of its card (class, data-*, hidden attribute)."""
    return {m.group(1): m.group(0) for m in re.finditer(r'<figure [^>]*data-id="([^"]+)"[^>]*>', dom)}


def test_digitize_documents_across_runs_summary_duckdb_and_contact_sheet_in_a_browser(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "photo.png").write_bytes(image_bytes(7))
    (src / "doc.pdf").write_bytes(pdf_bytes(3, "md"))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out, md = tmp_path / "pq", tmp_path / "md"
    args = [PAGEMILL, "digitize", "--input", str(src), "--output", str(out), "--model", str(smoke_checkpoint()),
            "--max-new-tokens", "4", "--pdf-longest-side", "384", "--markdown", str(md), "--contact-sheet"]
    first = subprocess.run(args + ["--page-range", "1"], cwd=tmp_path, env=env(), capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "<!-- page 1 -->" in (md / "doc.pdf.md").read_text() and "page 2" not in (md / "doc.pdf.md").read_text()
    # the second run does pages 2-3; page 1 comes from the sink, so the document is complete and in order
    second = subprocess.run(args, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Traceback" not in second.stderr and "please open an issue" not in second.stderr.lower()
    console = first.stdout + first.stderr + second.stdout + second.stderr
    for noise in ("Token authentication is enabled", "new progress UI", "Progress will be logged",
                  "Started a local Ray", "logging_progress", "Starting execution of Dataset"):
        assert noise not in console, noise
    doc = (md / "doc.pdf.md").read_text()
    assert [int(n) for n in re.findall(r"<!-- page (\d+) -->", doc)] == [1, 2, 3]
    assert (md / "sub" / "photo.png.md").is_file()
    assert (md / "broken.png.md").read_text().startswith("<!-- error: ")

    summary = json.loads((tmp_path / "pq.summary.json").read_text())
    assert (summary["items_ok"], summary["items_skipped"]) == (2, 3)  # pages 2-3 new; photo, page 1, broken done
    assert summary["finish_reasons"] == {"length": 2} and summary["started_at"] <= summary["ended_at"]
    assert summary["config"]["markdown"] == str(md) and "aws_secret_access_key" not in summary["config"]
    assert summary["first_errors"] == []  # this run had no new failure; the first run's is in the output:
    rows = read_rows(str(out))
    broken = next(r for r in rows if r["source"].endswith("broken.png"))
    assert broken["status"] == "error" and broken["finish_reason"] == "error"

    # nothing but Parquet in the directory: DuckDB's globs read it as it is
    for glob in (f"{out}/*", f"{out}/**/*.parquet"):
        assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall()[0][0] == 5

    sheet = tmp_path / "pq.contact_sheet.html"
    dom = chromium_dom(sheet, "", tmp_path / "chrome")
    assert re.search(r'id="n-ok">4<', dom) and re.search(r'id="n-error">1<', dom)
    assert re.search(r'id="shown">5<', dom)  # the script ran: every card shown, from both runs
    all_cards = cards(dom)
    assert len(all_cards) == 5 and "error" in all_cards[broken["id"]] and broken["error"].split(":")[-1].strip() in dom
    filtered = chromium_dom(sheet, "status=error", tmp_path / "chrome")
    shown = {k for k, tag in cards(filtered).items() if "hidden" not in tag}
    assert shown == {broken["id"]} and re.search(r'id="shown">1<', filtered)
    searched = chromium_dom(sheet, "q=photo.png", tmp_path / "chrome")
    assert [k for k, tag in cards(searched).items() if "hidden" not in tag] == \
        [r["id"] for r in rows if r["source"].endswith("photo.png")]


def test_readme_python_api_example_runs(tmp_path):
    readme = (REPO / "README.md").read_text()
    code = readme.split("<!-- readme-api-example -->\n```python\n", 1)[1].split("```", 1)[0]
    shutil.rmtree(REPO / "out" / "api-rows", ignore_errors=True)
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=400,
                       env=env(RAY_ADDRESS="local", PAGEMILL_CACHE=str(smoke_checkpoint().parent)))
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert p.stdout.count("'status': 'ok'") == 4 and "'finish_reason': 'length'" in p.stdout
    assert sorted(r["source"].rsplit("/", 1)[-1] for r in read_rows(str(REPO / "out" / "api-rows"))) == \
        ["invoice.png", "notes.pdf", "notes.pdf", "shelf.jpg"]
    shutil.rmtree(REPO / "out" / "api-rows", ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_ray_job_submit_recipe_works_as_written(tmp_path):
    """The README's lines, run by bash as they stand, against the token-authenticated cluster they start.

    Only what the README leaves to the environment differs: free ports (GCS_PORT, DASHBOARD_PORT, AGENT_PORT), a
    private HOME (so the token is this test's) and RAY_TMPDIR (so no other Ray on this machine sees it).
    """
    readme = (REPO / "README.md").read_text()
    recipe = readme.split("<!-- readme-submit-recipe -->\n```bash\n", 1)[1].split("```", 1)[0]
    db = Path("/tmp/pagemill-submit/digitize.db")
    for leftover in (db, Path(str(db) + "-wal"), Path(str(db) + "-shm"), Path(str(db) + ".summary.json")):
        leftover.unlink(missing_ok=True)
    home, ray_tmp = tmp_path / "home", Path(tempfile.mkdtemp(prefix="pmr", dir="/tmp"))  # short: unix sockets
    home.mkdir()
    e = env(HOME=str(home), RAY_TMPDIR=str(ray_tmp), GCS_PORT=str(_free_port()), DASHBOARD_PORT=str(_free_port()),
            AGENT_PORT=str(_free_port()))
    e.pop("RAY_AUTH_MODE", None)
    e.pop("RAY_AUTH_TOKEN", None)
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", recipe], cwd=REPO, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=500)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the head `ray start` left running, and all it spawned
        except ProcessLookupError:
            pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, output[-4000:]
    assert "succeeded" in output.lower() and (home / ".ray" / "auth_token").is_file()
    rows = read_rows(f"sqlite:///{db}")
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
