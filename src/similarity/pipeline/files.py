"""Score a whole CSV: stream rows in, score them, stream rows out. The CLI, the chunk workers and
the GPU task all call this, so every path writes the same bytes for the same input."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..cache import EmbeddingCache
from ..fetch import Fetcher
from ..io.csvfile import DEFAULT_MAX_FIELD, CsvReader, CsvWriter
from ..io.streams import open_input, open_output
from ..model import ClipModel
from ..types import ScoreStats
from .scorer import Scorer


@dataclass
class FileResult:
    stats: ScoreStats
    seconds: float
    header: list[str] = field(default_factory=list)

    @property
    def pairs_per_second(self) -> float:
        return self.stats.rows / self.seconds if self.seconds > 0 else 0.0


def score_stream(
    src: TextIO,
    dst: TextIO,
    model: ClipModel,
    fetcher: Fetcher,
    *,
    batch_size: int = 32,
    workers: int = 16,
    url_column: str | None = None,
    caption_column: str | None = None,
    max_field: int = DEFAULT_MAX_FIELD,
    excel_safe: bool = False,
    write_header: bool = True,
    on_row: Callable[[int], None] | None = None,
    cache: EmbeddingCache | None = None,
) -> FileResult:
    start = time.perf_counter()
    reader = CsvReader(src, url_column=url_column, caption_column=caption_column, max_field=max_field)
    writer = CsvWriter(dst, reader.header, excel_safe=excel_safe, write_header=write_header)
    scorer = Scorer(model, fetcher, batch_size=batch_size, workers=workers, cache=cache)
    for result in scorer.score(reader):
        writer.write(result)
        if on_row is not None:
            on_row(1)
    return FileResult(scorer.stats, time.perf_counter() - start, reader.header)


def score_csv(
    input_uri: str,
    output_uri: str,
    model: ClipModel,
    fetcher: Fetcher,
    s3_client: Any = None,
    **kwargs: Any,
) -> FileResult:
    """Local paths, ``-`` or ``s3://`` URIs on either side. The output appears only when complete."""
    with open_input(input_uri, s3_client) as src, open_output(output_uri, s3_client) as dst:
        return score_stream(src, dst, model, fetcher, **kwargs)
