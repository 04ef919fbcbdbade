"""ECS GPU task: score a whole (very large) CSV with the same library on CUDA and write the same
output and manifest as the Lambda path. Batch size and workers come from the settings like
everywhere else (the task definition sets SIMILARITY_BATCH_SIZE / SIMILARITY_WORKERS).

    python -m handler.gpu_task --bucket B --input-key incoming/x.csv --output-key scored/x_scored.csv \
        [--output-bucket B] [--job-id ID]
"""

from __future__ import annotations

import argparse
import logging
import time

from similarity.errors import RunError

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
    manifest = jobs.load(args.bucket, args.job_id) if args.job_id else None
    model = s.run.model
    log.info("model %s on %s/%s", model.info.model_id, model.info.backend, model.info.device)
    start = time.perf_counter()
    excel_safe = manifest.excel_safe if manifest is not None else s.settings.score.excel_safe
    try:
        result = s.run.score_csv(
            f"s3://{args.bucket}/{args.input_key}",
            f"s3://{args.output_bucket or args.bucket}/{args.output_key}",
            excel_safe=excel_safe,
        )
    except RunError as exc:
        log.error("job failed: %s", exc)
        if manifest is not None:
            jobs.fail(manifest, str(exc))
        return 2
    st = result.stats
    log.info("rows %d scored %d errors %s in %.1fs", st.rows, st.scored, st.errors, time.perf_counter() - start)
    if manifest is not None:
        jobs.complete_whole(manifest, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
