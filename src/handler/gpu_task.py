"""ECS GPU task: score a whole (very large) CSV with the same library on CUDA and write the same
output and manifest as the Lambda path.

    python -m handler.gpu_task --bucket B --input-key incoming/x.csv --output-key scored/x_scored.csv \
        [--output-bucket B] [--job-id ID]
"""

from __future__ import annotations

import argparse
import logging
import time

from similarity.csvjob import score_csv
from similarity.errors import JobError

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
    s = runtime.settings()
    jobs = runtime.jobs()
    manifest = jobs.load(args.bucket, args.job_id) if args.job_id else None
    model = runtime.model()
    log.info("model %s on %s/%s", model.info.model_id, model.info.backend, model.info.device)
    start = time.perf_counter()
    try:
        result = score_csv(f"s3://{args.bucket}/{args.input_key}", f"s3://{args.output_bucket or args.bucket}/{args.output_key}",
                           model, runtime.fetcher(), s3_client=jobs.s3, batch_size=max(s.core.batch_size, 128),
                           workers=max(s.core.workers, 32))
    except JobError as exc:
        log.error("job failed: %s", exc)
        if manifest is not None:
            manifest.state, manifest.reason, manifest.finished_at = "failed", str(exc), time.time()
            jobs.save(manifest)
        return 2
    st = result.stats
    log.info("rows %d scored %d errors %s in %.1fs", st.rows, st.scored, st.errors, time.perf_counter() - start)
    if manifest is not None:
        manifest.state, manifest.finished_at = "done", time.time()
        manifest.row_count, manifest.scored, manifest.errors = st.rows, st.scored, st.errors
        manifest.compute_seconds = result.seconds
        jobs.save(manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
