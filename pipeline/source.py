"""A Ray Data datasource over `connectors.sources.list_inputs`, so listing streams too.

One read task walks the listing lazily and yields small blocks of refs; backpressure from the
slower stages then bounds how far ahead it runs (and how many Parquet image bytes are in flight).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from connectors.sources import SourceOptions, list_inputs

REF_SCHEMA = pa.schema([("source", pa.string()), ("data", pa.binary()), ("key", pa.string())])
_BLOCK_BYTES = 32 * 1024 * 1024


def iter_ref_blocks(spec: str, options: SourceOptions, limit: int | None, block_rows: int = 16) -> Iterator[pa.Table]:
    """Blocks of `block_rows` refs (one preprocessing batch each), or fewer when they carry many bytes.

    Small blocks are what make the whole pipeline stream: a Ray Data task emits its output when it
    ends (or when a block fills up), so one big input block would reach the sink as one late burst.
    """
    rows: list[dict] = []
    size = 0
    for ref in islice(list_inputs(spec, options=options), limit):
        rows.append({"source": ref.source, "data": ref.data, "key": ref.key})
        size += len(ref.data or b"")
        if len(rows) >= block_rows or size >= _BLOCK_BYTES:
            yield pa.Table.from_pylist(rows, schema=REF_SCHEMA)
            rows, size = [], 0
    if rows:
        yield pa.Table.from_pylist(rows, schema=REF_SCHEMA)


class InputsDatasource(Datasource):
    def __init__(self, spec: str, options: SourceOptions, limit: int | None = None, block_rows: int = 16) -> None:
        self.spec, self.options, self.limit, self.block_rows = spec, options, limit, block_rows

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        spec, options, limit, rows = self.spec, self.options, self.limit, self.block_rows
        meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        return [ReadTask(lambda: iter_ref_blocks(spec, options, limit, rows), meta, schema=REF_SCHEMA)]
