"""Peak memory of the CPU stage (Preprocess: read, rasterize, tile, pack) over one big PDF, by page count.

    python bench/memory_bench.py [--pages 150 300 1000] [--one-block 50 150] [--resume 150] [--ray 150 300]
        [--out bench/results-memory.json]

Each measurement runs in a fresh subprocess: Preprocess (real-size tiling, the smoke checkpoint's processor)
over one N-page PDF of full-page scans (A4 at 150 dpi, JPEG), every output chunk consumed and dropped as Ray
would ship it, and the child's peak RSS while it runs recorded (sampled every 5 ms, so start-up is not counted). `--one-block` repeats it with every page's
rows gathered into one block before anything is yielded and glibc's default mmap threshold, which is what the
stage did before pages streamed. `--resume` times a re-run over a PDF whose pages are all done, before
(every page rendered, then skipped) and now (none rendered). `--ray` runs the stage as the job does (Ray
Data, one Preprocess actor) and samples the actor's RSS from outside.
Inside Ray the actor also buffers up to one output block (Ray Data's target_max_block_size, 128 MiB) on top.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_pdf(path: Path, pages: int) -> None:
    """Full-page scans: text lines and a drawing on A4 at 150 dpi, one JPEG image per page.

    Written object by object (a minimal PDF with DCTDecode images), so making a 1000-page file holds one
    page at a time; Pillow's own PDF writer would hold every page image at once (gigabytes).
    """
    from PIL import Image, ImageDraw

    def page_jpeg(n: int) -> bytes:
        img = Image.new("RGB", (1240, 1754), "white")
        d = ImageDraw.Draw(img)
        for line in range(60):
            d.text((90, 90 + line * 26), f"page {n} line {line}: the quick brown fox jumps over the lazy dog " * 2,
                   fill=(20, 20, 20))
        d.rectangle((700, 1300, 1100, 1650), outline=(200, 30, 30), width=6)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=75)
        return buf.getvalue()

    w_pt, h_pt = 595.2, 841.9  # A4
    offsets: list[int] = []
    with open(path, "wb") as f:
        def obj(body: bytes, stream: bytes | None = None) -> None:
            offsets.append(f.tell())
            f.write(b"%d 0 obj\n" % len(offsets) + body)
            if stream is not None:
                f.write(b"\nstream\n" + stream + b"\nendstream")
            f.write(b"\nendobj\n")

        f.write(b"%PDF-1.4\n")
        kids = " ".join(f"{3 + 3 * i} 0 R" for i in range(pages)).encode()
        obj(b"<< /Type /Catalog /Pages 2 0 R >>")
        obj(b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, pages))
        for n in range(1, pages + 1):
            page, image, content = 3 + 3 * (n - 1), 4 + 3 * (n - 1), 5 + 3 * (n - 1)
            jpeg = page_jpeg(n)
            draw = b"q %.1f 0 0 %.1f 0 0 cm /Im0 Do Q" % (w_pt, h_pt)
            obj(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %.1f %.1f] /Resources << /XObject << /Im0 %d 0 R >> >>"
                b" /Contents %d 0 R >>" % (w_pt, h_pt, image, content))
            obj(b"<< /Type /XObject /Subtype /Image /Width 1240 /Height 1754 /ColorSpace /DeviceRGB /BitsPerComponent 8"
                b" /Filter /DCTDecode /Length %d >>" % len(jpeg), jpeg)
            obj(b"<< /Length %d >>" % len(draw), draw)
        xref = f.tell()
        f.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(offsets) + 1))
        f.write(b"".join(b"%010d 00000 n \n" % o for o in offsets))
        f.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(offsets) + 1, xref))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakSampler:
    """The highest RSS seen while running (every 5 ms): ru_maxrss would include start-up (imports, torch)."""

    def __init__(self) -> None:
        import threading

        self.peak = rss_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return max(self.peak, rss_mb())


def child(pdf: str, one_block: bool, resume: bool = False) -> dict:
    import numpy as np

    import pipeline.preprocess as preprocess
    from connectors.decode import content_key, row_id
    from pipeline.checkpoint import smoke_checkpoint
    from pipeline.config import JobConfig
    from pipeline.resume import DoneSet

    if one_block:  # as before: every row of the document in one block, glibc's default mmap threshold
        preprocess._CHUNK_ROWS = 10**9
        preprocess._big_allocations_from_mmap = lambda: None
        if resume:  # and every page rendered before its id was checked
            expand = preprocess.expand
            preprocess.expand = lambda source, data, limits, skip=None: expand(source, data, limits=limits)
    model = str(smoke_checkpoint())
    config = JobConfig(input=pdf, output="unused", model=model, max_pdf_pages=100_000, max_bytes=2**30)
    done = frozenset()
    if resume:  # a re-run over a finished output: every page of the document is done
        key = content_key(Path(pdf).read_bytes())
        done = DoneSet.of(row_id(key, n) for n in range(1, 100_001))
    pre = preprocess.Preprocess(config, model, done_ids=done)
    base = rss_mb()
    sampler = PeakSampler()
    t0 = time.perf_counter()
    first_s = None
    rows = chunks = prep_bytes = 0
    for out in pre({"source": np.array([pdf], dtype=object)}):
        if first_s is None:
            first_s = time.perf_counter() - t0
        chunks += 1
        rows += len(out["id"])
        prep_bytes += sum(len(b) for b in out["prep"])
        assert all(s == ("skipped" if resume else "ok") for s in out["status"]), set(out["error"])
        del out
    peak = sampler.stop()
    return {"rows": rows, "chunks": chunks, "seconds": round(time.perf_counter() - t0, 1),
            "first_chunk_s": round(first_s or 0.0, 2), "prep_mb_per_page": round(prep_bytes / max(rows, 1) / 2**20, 2),
            "rss_before_mb": round(base), "peak_rss_mb": round(peak)}


def ray_child(pdf: str) -> dict:
    """The CPU stage as the job runs it: Ray Data, one Preprocess actor; its RSS sampled from outside."""
    import threading

    import ray

    from pipeline.checkpoint import smoke_checkpoint
    from pipeline.config import JobConfig
    from pipeline.preprocess import Preprocess, source_options
    from pipeline.source import InputsDatasource

    model = str(smoke_checkpoint())
    config = JobConfig(input=pdf, output="unused", model=model, max_pdf_pages=100_000, max_bytes=2**30,
                       cpu_batch_size=1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ds = ray.data.read_datasource(InputsDatasource(pdf, source_options(config)), override_num_blocks=1, num_cpus=0)
    ds = ds.map_batches(Preprocess, fn_constructor_kwargs=dict(config=config, model_path=model), batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1, batch_format="numpy")
    peak = {"rss": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            for d in Path("/proc").iterdir():
                try:
                    if d.name.isdigit() and b"Preprocess" in (d / "cmdline").read_bytes():
                        for line in (d / "status").read_text().splitlines():
                            if line.startswith("VmRSS:"):
                                peak["rss"] = max(peak["rss"], int(line.split()[1]) / 1024)
                except OSError:
                    continue

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    first_s, rows = None, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        first_s = first_s if first_s is not None else time.perf_counter() - t0
        rows += len(batch["id"])
    stop.set()
    t.join()
    ray.shutdown()
    return {"rows": rows, "seconds": round(time.perf_counter() - t0, 1), "first_rows_s": round(first_s or 0, 1),
            "actor_peak_rss_mb": round(peak["rss"])}


def measure(pages: int, one_block: bool, tmp: Path, resume: bool = False) -> dict:
    pdf = tmp / f"doc{pages}.pdf"
    if not pdf.exists():
        make_pdf(pdf, pages)
    cmd = [sys.executable, __file__, "--child", str(pdf)] + (["--one-block-child"] if one_block else [])
    cmd += ["--resume-child"] if resume else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    mode = ("re-run, all pages done: " if resume else "") + ("before" if one_block else "now")
    return {"pages": pages, "mode": mode, "pdf_mb": round(pdf.stat().st_size / 2**20, 1)} | result


def measure_ray(pages: int, tmp: Path) -> dict:
    pdf = tmp / f"doc{pages}.pdf"
    if not pdf.exists():
        make_pdf(pdf, pages)
    out = subprocess.run([sys.executable, __file__, "--ray-child", str(pdf)], capture_output=True, text=True,
                         check=True, cwd=REPO)
    return {"pages": pages, "mode": "now, Ray actor"} | json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, nargs="*", default=[150, 300, 1000])
    ap.add_argument("--one-block", type=int, nargs="*", default=[50, 150])
    ap.add_argument("--out", default=str(REPO / "bench" / "results-memory.json"))
    ap.add_argument("--child")
    ap.add_argument("--one-block-child", action="store_true")
    ap.add_argument("--resume", type=int, nargs="*", default=[150])
    ap.add_argument("--resume-child", action="store_true")
    ap.add_argument("--ray", type=int, nargs="*", default=[])
    ap.add_argument("--ray-child")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.one_block_child, args.resume_child)))
        return
    if args.ray_child:
        print(json.dumps(ray_child(args.ray_child)))
        return
    results: list[dict] = []
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "python": platform.python_version(), "pdf": "A4 150 dpi JPEG scans, rasterized at pdf_longest_side 1288"}

    def save() -> None:  # after every measurement: a long run stopped early keeps what it measured
        meta["load_average"] = os.getloadavg()[0]
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="pm-membench-") as tmp:
        runs = [(p, False, False) for p in args.pages] + [(p, True, False) for p in args.one_block]
        runs += [(p, one, True) for p in args.resume for one in (True, False)]
        for pages, one, resume in runs:
            r = measure(pages, one, Path(tmp), resume)
            print(json.dumps(r), flush=True)
            results.append(r)
            save()
        for pages in args.ray:
            r = measure_ray(pages, Path(tmp))
            print(json.dumps(r), flush=True)
            results.append(r)
            save()


if __name__ == "__main__":
    main()
