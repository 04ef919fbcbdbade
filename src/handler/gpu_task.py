"""ECS GPU task: score a whole (very large) CSV with the same library on CUDA and write the same
output and manifest as the Lambda path. Batch size and workers come from the settings like
everywhere else (the task definition sets SIMILARITY_BATCH_SIZE / SIMILARITY_WORKERS).

    python -m handler.gpu_task --bucket B --input-key incoming/x.csv --output-key scored/x_scored.csv \
        [--output-bucket B] [--job-id ID]

With ``--job-id`` it reads the source version the job recorded (not a newer upload), and the
job's manifest records the outcome. The output is streamed to S3 as a multipart upload, never
spooled to local disk, and appears only complete. A task that dies without a word (killed,
out of memory) is failed by ``handler.task_stopped`` from ECS's task state change.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterable
from typing import TextIO

from similarity.errors import RunError
from similarity.jobs import JobPath, JobState, Location, Manifest
from similarity.pipeline import FileResult, score_stream

from . import runtime

log = logging.getLogger("gpu_task")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    ap = argparse.ArgumentParser(prog="python -m handler.gpu_task")
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--input-key", required=True)
    ap.add_argument("--output-bucket")
    ap.add_argument("--output-key", required=True)
    ap.add_argument("--job-id")
    args = ap.parse_args(argv)
    s = runtime.services()
    jobs = s.jobs
    tracked = jobs.load(args.bucket, args.job_id) if args.job_id else None
    now = time.time()
    job = tracked or Manifest(
        job_id=args.job_id or "manual",
        state=JobState.GPU,
        path=JobPath.GPU,
        source=Location(bucket=args.bucket, key=args.input_key),
        output=Location(bucket=args.output_bucket or args.bucket, key=args.output_key),
        created_at=now,
        updated_at=now,
        excel_safe=s.settings.score.excel_safe,
    )
    run = s.run
    model = run.model
    log.info("model %s on %s/%s", model.info.model_id, model.info.backend, model.info.device)
    start = time.perf_counter()

    def score(src: Iterable[str], dst: TextIO) -> FileResult:
        return score_stream(
            src,
            dst,
            model,
            run.fetcher,
            batch_size=run.batch_size,
            workers=run.workers,
            excel_safe=job.excel_safe,
            cache=run.cache,
            processes=run.processes,
        )

    try:
        result = jobs.score_whole(job, score)
    except RunError as exc:
        log.error("job failed: %s", exc)
        if tracked is not None:
            jobs.fail(tracked, str(exc))
        return 2
    except Exception as exc:
        log.exception("job failed")
        if tracked is not None:
            jobs.fail(tracked, f"gpu_task_failed: {type(exc).__name__}: {exc}")
        return 1
    st = result.stats
    log.info("rows %d scored %d errors %s in %.1fs", st.rows, st.scored, st.errors, time.perf_counter() - start)
    if tracked is not None:
        jobs.complete_whole(tracked, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
