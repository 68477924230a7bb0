"""Resume at scale: the done-set of a synthetic Parquet output of 10 million rows, before and after.

    python bench/doneset_bench.py [--rows 10000000] [--actors 2] [--out bench/results-doneset.json]

The output is a real LocalParquetSink directory (100 parts, the row schema, realistic ids: 32 hex + page,
5% error rows). Each measurement runs in a fresh subprocess and records its peak RSS (ru_maxrss):

* before: `frozenset(sink.done_ids())` in the driver, pickled into every CPU actor's constructor; an
  actor's cost is unpickling that frozenset (measured in its own process).
* after: `pipeline.resume.load_done_set(sink)` in the driver (chunked, 20 bytes per id), `ray.put` once, and
  `--actors` Ray actors that each receive the DoneSet handle and look ids up; per actor: RSS and USS growth
  (USS excludes the shared object-store pages), time to first lookup.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _peak_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _rss_uss_mb() -> tuple[float, float]:
    """(RSS, USS) of this process: USS counts only its private pages, not the shared object-store mapping."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        k, v = line.split(":", 1)
        fields[k] = int(v.split()[0]) / 1024
    return fields["Rss"], fields["Private_Clean"] + fields["Private_Dirty"]


def make_output(root: Path, rows: int, parts: int = 100) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from connectors.rows import ROW_ARROW_SCHEMA

    rng = np.random.default_rng(0)
    hexdig = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    root.mkdir(parents=True)
    per = rows // parts
    for k in range(parts):
        n = per if k < parts - 1 else rows - per * (parts - 1)
        raw = rng.integers(0, 256, (n, 16), dtype=np.uint8)
        chars = np.empty((n, 36), dtype=np.uint8)
        chars[:, 0:32:2], chars[:, 1:32:2] = hexdig[raw >> 4], hexdig[raw & 15]
        chars[:, 32:] = np.frombuffer(b":1\0\0", dtype=np.uint8)  # ":1" padded; trimmed by the offsets below
        pages = rng.integers(1, 9, n)
        chars[:, 33] = (ord("0") + pages).astype(np.uint8)
        offsets = np.arange(n + 1, dtype=np.int32) * 34
        data = np.ascontiguousarray(chars[:, :34]).tobytes()
        ids = pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)])
        status = pa.array(np.where(rng.random(n) < 0.05, "error", "ok"))
        cols = {f.name: pa.nulls(n, f.type) for f in ROW_ARROW_SCHEMA}
        cols |= {"id": ids, "status": status, "source": pa.array(["/in/doc.pdf"] * n), "model": pa.array(["m"] * n),
                 "prompt": pa.array(["p"] * n), "config_hash": pa.array(["h"] * n), "job": pa.array(["digitize"] * n),
                 "created_at": pa.array(["2026-12-01T00:00:00+00:00"] * n)}
        pq.write_table(pa.table(cols, schema=ROW_ARROW_SCHEMA), root / f"part-{k:05d}.parquet")


def before(out: str, probe_path: str) -> dict:
    from connectors.sinks import open_sink

    t0 = time.perf_counter()
    done = frozenset(open_sink(out).done_ids(include_errors=False))
    build_s = time.perf_counter() - t0
    blob = pickle.dumps(done, protocol=5)
    Path(probe_path).write_bytes(blob)
    return {"ids": len(done), "driver_build_s": round(build_s, 1), "driver_peak_rss_mb": _peak_mb(),
            "per_actor_payload_mb": round(len(blob) / 2**20)}


def before_actor(probe_path: str) -> dict:
    blob = Path(probe_path).read_bytes()
    base = _rss_uss_mb()[0]
    t0 = time.perf_counter()
    done = pickle.loads(blob)
    start_s = time.perf_counter() - t0
    del blob
    return {"actor_start_s": round(start_s, 1), "actor_rss_growth_mb": round(_rss_uss_mb()[0] - base),
            "ids": len(done)}


def after(out: str, actors: int) -> dict:
    import ray

    from connectors.sinks import open_sink
    from pipeline.resume import load_done_set

    t0 = time.perf_counter()
    done = load_done_set(open_sink(out), include_errors=False)
    build_s = time.perf_counter() - t0
    driver_peak = _peak_mb()
    ray.init(address="local", num_cpus=actors, include_dashboard=False, log_to_driver=False)
    t1 = time.perf_counter()
    handle = pickle.dumps(done)  # ray.put of the keys happens here, once
    put_s = time.perf_counter() - t1

    @ray.remote(num_cpus=1)
    class Probe:
        def __init__(self) -> None:
            import pipeline.resume  # noqa: F401 - its imports (numpy, pyarrow) are not the done-set's cost

            self.base = _rss_uss_mb()

        def use(self, d, probes: list[str]) -> dict:
            t = time.perf_counter()
            hits = sum(p in d for p in probes)
            first = time.perf_counter() - t
            rss, uss = _rss_uss_mb()
            return {"hits": hits, "lookups_1000_s": round(first, 3), "rss_growth_mb": round(rss - self.base[0]),
                    "uss_growth_mb": round(uss - self.base[1])}

    from pipeline.resume import iter_ids

    probes = [i for _, i in zip(range(1000), iter_ids(done))]
    pool = [Probe.remote() for _ in range(actors)]
    per_actor = ray.get([a.use.remote(done, probes) for a in pool])
    ray.shutdown()
    return {"ids": len(done), "driver_build_s": round(build_s, 1), "driver_peak_rss_mb": driver_peak,
            "done_set_mb": round(done.nbytes / 2**20), "per_actor_payload_bytes": len(handle),
            "ray_put_s": round(put_s, 2), "actors": per_actor}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results-doneset.json"))
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        fn = {"before": lambda: before(rest[0], rest[1]), "before_actor": lambda: before_actor(rest[0]),
              "after": lambda: after(rest[0], int(rest[1]))}[kind]
        print(json.dumps(fn()))
        return
    with tempfile.TemporaryDirectory(prefix="pm-donebench-") as tmp:
        out = Path(tmp) / "out"
        t0 = time.perf_counter()
        make_output(out, args.rows)
        print(f"synthetic output: {args.rows} rows in {time.perf_counter() - t0:.0f}s", flush=True)
        result = {"after": run_child("after", str(out), str(args.actors))}
        print(json.dumps(result["after"]), flush=True)
        probe = str(Path(tmp) / "frozenset.pickle")
        result["before"] = run_child("before", str(out), probe) | run_child("before_actor", probe)
        print(json.dumps(result["before"]), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "rows": args.rows, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "output": "LocalParquetSink, 100 parts, 5% error rows (not done)",
            "load_average_at_end": os.getloadavg()[0]}
    Path(args.out).write_text(json.dumps({"meta": meta} | result, indent=2) + "\n")


if __name__ == "__main__":
    main()
