"""What a run makes besides rows, fed from the driver's loop: Markdown documents, the contact sheet,
the progress line. `run_job` calls `add` per finished batch and `finish` once the sink is complete."""

from __future__ import annotations

from typing import Any

from connectors.redact import redact
from pipeline.config import JobConfig
from pipeline.contact_sheet import CARD_COLUMNS, SheetBuilder, SheetHeader
from pipeline.markdown import MarkdownWriter, input_root, local_pdf_pages
from pipeline.progress import Progress
from pipeline.summary import Tally, side_path


class RunOutputs:
    def __init__(self, config: JobConfig, sink: object, *, started_at: str, smoke: bool, listing: Any = None) -> None:
        from pipeline.run import s3_options

        self.config, self.started_at, self.smoke = config, started_at, smoke
        self.markdown = None
        if config.markdown:
            from connectors.scan import iter_rows

            prior = {r["source"] for r in iter_rows(sink, ["source"])}
            self.markdown = MarkdownWriter(config.markdown, input_root(config.input), s3_options(config),
                                           expected=local_pdf_pages(config.page_range, config.max_pdf_pages),
                                           prior=prior)
        self.sheet = SheetBuilder(side_path(config, "contact_sheet.html", started_at), config.contact_sheet_max) \
            if config.contact_sheet else None
        self.progress = Progress(config.job, listing, limit=config.limit)
        self._sources: set[str] = set()

    def add(self, rows: list[dict], thumbs: list[bytes], tally: Tally) -> None:
        if self.markdown is not None:
            self.markdown.add(rows)
        if self.sheet is not None:
            for row, thumb in zip(rows, thumbs):
                self.sheet.add(row, thumb)
        self._sources.update(r["source"] for r in rows)
        self.progress.update(len(self._sources) + tally.skipped, tally.ok + tally.failed, tally.failed)

    def finish(self, sink: object, tally: Tally) -> tuple[str | None, int]:
        """(contact sheet path, Markdown documents written); both are rebuilt from the whole output."""
        from connectors.scan import iter_rows

        self.progress.update(len(self._sources) + tally.skipped, tally.ok + tally.failed, tally.failed, force=True)
        self.progress.close()
        docs = self.markdown.finish(sink) if self.markdown is not None else 0
        sheet = None
        if self.sheet is not None:
            header = SheetHeader(job=self.config.job, model=redact(self.config.model), smoke_model=self.smoke,
                                 started_at=self.started_at, output=redact(self.config.output), skipped=tally.skipped)
            sheet = str(self.sheet.write(iter_rows(sink, CARD_COLUMNS), header))
        return sheet, docs

    def close(self) -> None:
        self.progress.close()
