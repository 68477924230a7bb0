"""The jobs as users run them, in subprocesses: SIGKILL of the driver then resume, the smoke
checkpoint warning, and no credentials anywhere (`ray job submit` to a real token-authenticated
cluster: tests/test_ux_e2e.py runs the README's recipe)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest

from tests.s3server import s3_endpoint  # noqa: F401 - fixture
from tests.test_pipeline_support import REPO, image_bytes, pdf_bytes, read_rows, smoke_checkpoint

def job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1", **extra)
    return env


def kill_group(proc: subprocess.Popen) -> None:
    """Our subprocess ran in its own session; end whatever of it is left (its local Ray too)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def count_rows(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM pagemill_rows").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_sigkill_driver_then_rerun_gives_exactly_one_row_per_item(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    # Full-size pages (~18 MB of tiles each) so that Ray Data's blocks hold a few pages and rows reach
    # the sink in several writes: the kill lands between two of them.
    for k in range(3):
        (src / f"doc{k}.pdf").write_bytes(pdf_bytes(8, f"kill{k}"))
    (src / "photo.png").write_bytes(image_bytes(100))
    n = 3 * 8 + 1
    db = tmp_path / "out" / "rows.db"
    args = [sys.executable, "-m", "jobs.digitize", "--input", str(src), "--output", f"sqlite:///{db}",
            "--model", "smoke", "--max-new-tokens", "16", "--cpu-batch-size", "1", "--model-batch-size", "2"]
    env = job_env(PAGEMILL_CACHE=str(smoke_checkpoint().parent / "cache"))
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while count_rows(db) == 0 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)  # the driver, mid-run
        proc.wait(timeout=30)
    finally:
        kill_group(proc)
    landed = count_rows(db)
    assert 0 < landed < n, f"expected a partial run at the kill, found {landed}/{n} rows"

    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RANDOM" in done.stdout and "smoke" in done.stdout  # the smoke checkpoint says so plainly
    rows = read_rows(f"sqlite:///{db}")
    assert len(rows) == n and len({r["id"] for r in rows}) == n
    assert all(r["status"] == "ok" for r in rows)
    summary = json.loads(Path(str(db) + ".summary.json").read_text())
    assert summary["items_skipped"] == landed and summary["items_ok"] == n - landed


def test_credentials_never_in_logs_rows_or_summaries(tmp_path, s3_endpoint):  # noqa: F811
    import psycopg

    password = "pw-" + uuid.uuid4().hex[:10]
    key_id, secret = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="private")
    s3.put_object(Bucket="private", Key="in/a.png", Body=image_bytes(200))
    s3.put_object(Bucket="private", Key="in/broken.png", Body=b"\x89PNG\r\n\x1a\nbroken")
    table = "t_" + uuid.uuid4().hex[:12]
    dsn = f"postgresql://postgres:{password}@127.0.0.1:5432/test"  # trust auth: the password is ignored
    summary = tmp_path / "summary.json"
    env = job_env(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret, AWS_ENDPOINT_URL=s3_endpoint,
                  AWS_DEFAULT_REGION="us-east-1")
    args = [sys.executable, "-m", "jobs.digitize", "--input", "s3://private/in/", "--output", dsn,
            "--table", table, "--model", str(smoke_checkpoint()), "--max-new-tokens", "4",
            "--summary-path", str(summary)]
    try:
        run = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        rows = read_rows(f"postgresql://postgres@127.0.0.1:5432/test", table)
        assert sorted(r["status"] for r in rows) == ["error", "ok"]
        # a sink that cannot be reached: the error names it without the password
        bad = subprocess.run(args[:6] + ["postgresql://postgres:" + password + "@127.0.0.1:1/test"] + args[7:],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert bad.returncode == 1 and "127.0.0.1" in bad.stderr
    finally:
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
    everything = run.stdout + run.stderr + bad.stdout + bad.stderr + summary.read_text() + json.dumps(rows, default=str)
    ray_logs = "".join(p.read_text(errors="replace") for p in Path("/tmp/ray/session_latest/logs").glob("*")
                       if p.is_file() and p.stat().st_size < 5_000_000)
    for s in (password, secret, key_id):
        assert s not in everything, s
        assert s not in ray_logs, s


def _descendants(root: int, needle: str) -> list[int]:
    """Processes below `root` (its local Ray's raylet and workers) whose command line contains `needle`."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found = []
    for pid in parent:
        p, depth = pid, 0
        while p in parent and p != root and depth < 20:
            p, depth = parent[p], depth + 1
        if p == root and pid != root:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmd:
                found.append(pid)
    return found


def test_model_actor_restarts_exhausted_is_one_error_line_and_rows_are_kept(tmp_path):
    """SIGKILL the model actor with max_actor_restarts 0: exit 1, one `pagemill digitize: error:` line, no traceback."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(40):
        (src / f"i{i:02d}.png").write_bytes(image_bytes(300 + i))
    db = tmp_path / "rows.db"
    args = [sys.executable, "-m", "jobs.digitize", "--input", str(src), "--output", f"sqlite:///{db}",
            "--model", str(smoke_checkpoint()), "--max-new-tokens", "24", "--cpu-batch-size", "1",
            "--model-batch-size", "1", "--max-actor-restarts", "0",
            # one item at a time in the engine, so rows land one by one and the kill falls mid-run
            "--batches-in-flight", "1", "--engine-max-seqs", "1"]
    proc = subprocess.Popen(args, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while count_rows(db) == 0 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        victims = _descendants(proc.pid, "Generate")
        assert victims, "no model actor process found"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    finally:
        kill_group(proc)
    landed = count_rows(db)
    assert proc.returncode == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("pagemill digitize:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("pagemill digitize: error: a model actor died more often than max_actor_restarts (0)")
    assert 0 < landed < 40 and len({r["id"] for r in read_rows(f"sqlite:///{db}")}) == landed
