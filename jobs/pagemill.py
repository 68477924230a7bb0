"""The `pagemill` command: `pagemill digitize|catalog|export|inspect ...`, `pagemill --version`."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

from jobs.cli import first_line, main as run_job_cli

USAGE = """pagemill <command> [options]

commands:
  digitize   documents and PDFs -> markdown text, one row per page/image (pagemill digitize --help)
  catalog    photos of objects -> caption, items, label text, and a contact sheet (pagemill catalog --help)
  export     build outputs from an existing output without running the model (pagemill export --help)
  inspect    what an output holds: counts by status, finish reason, job, config; the latest errors
"""


def _version() -> str:
    try:
        return version("pagemill")
    except PackageNotFoundError:  # running from a checkout that is not installed
        return "unknown"


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table", default="pagemill_rows", help="SQL table of a SQLite/PostgreSQL output")
    p.add_argument("--s3-endpoint-url", default=None, help="S3 endpoint (MinIO, moto...); default AWS")


def _open(args: argparse.Namespace):
    from connectors.s3 import S3Options
    from connectors.sinks import open_sink

    s3 = S3Options(endpoint_url=args.s3_endpoint_url)
    return open_sink(args.output, table=args.table, s3=s3), s3


def export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pagemill export", description="Build per-document Markdown files from the "
                                "rows of an existing output (no model, no Ray).",
                                epilog="example:\n  pagemill export --output out/pages --markdown out/md",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="the output to read: a Parquet directory, sqlite:///, postgresql://")
    p.add_argument("--markdown", required=True, metavar="DIR", help="where to write <source path>.md (local or s3://)")
    p.add_argument("--input", default=None, metavar="ROOT", help="the input root that paths are made relative to "
                   "(default: the deepest folder holding every source)")
    _store_args(p)
    args = p.parse_args(argv)
    from pipeline.markdown import export_markdown, input_root

    sink, s3 = _open(args)
    try:
        n = export_markdown(sink, args.markdown, input_root(args.input) if args.input else None, s3)
    finally:
        sink.close()
    print(f"pagemill export: {n} document(s) written under {args.markdown}")
    return 0


def inspect(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pagemill inspect", description="Counts by status, finish reason, job and "
                                "config_hash of an output, and its latest errors.",
                                epilog="example:\n  pagemill inspect sqlite:///out/digitize.db",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="a Parquet directory (local or s3://), sqlite:///..., postgresql://...")
    p.add_argument("--errors", type=int, default=10, metavar="N", help="how many of the latest errors to list")
    _store_args(p)
    args = p.parse_args(argv)
    from pipeline.inspect import inspect_output

    sink, _ = _open(args)
    try:
        print(inspect_output(sink, errors=args.errors))
    finally:
        sink.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"pagemill {_version()}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in ("digitize", "catalog"):
        return run_job_cli(cmd, rest)
    tools = {"export": export, "inspect": inspect}
    if cmd not in tools:
        print(f"pagemill: error: unknown command {cmd!r} (digitize, catalog, export, inspect)", file=sys.stderr)
        return 2
    from connectors.errors import InputError, SinkError
    from connectors.redact import redact

    try:
        return tools[cmd](rest)
    except (InputError, SinkError, ValueError, RuntimeError, OSError) as e:
        print(f"pagemill {cmd}: error: {first_line(redact(e))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
