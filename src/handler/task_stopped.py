"""EventBridge "ECS Task State Change" for a stopped GPU task: a job still in state ``gpu`` fails
with the task's reason (exit code, stop code, ECS's reason), so ``GET /jobs/{id}`` shows it instead
of ``gpu`` for good. The rule (template.yaml, ``GpuTaskStoppedFunction``) sends only tasks of the
GPU cluster that a job started (``startedBy: job-...``) and that stopped; a task that finished its
job has already marked it done (or failed, with its own reason), and is left as it is."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.metrics import MetricUnit

from similarity.jobs import JobState

from . import runtime
from .observability import logger, metrics_for

metrics = metrics_for("task_stopped")


def _arg(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command and command.index(flag) + 1 < len(command) else None


def describe(detail: dict[str, Any]) -> str:
    """One line: how the task stopped, and each container's exit."""
    parts = [f"task {detail.get('taskArn', '?')} stopped"]
    if detail.get("stopCode") or detail.get("stoppedReason"):
        parts.append(f"({detail.get('stopCode', '')}: {detail.get('stoppedReason', '')})")
    for c in detail.get("containers", []):
        exit_code = c.get("exitCode")
        text = f"container {c.get('name')} " + ("never ran" if exit_code is None else f"exit {exit_code}")
        if c.get("reason"):
            text += f": {c['reason']}"
        parts.append(text)
    return "; ".join(parts)


@logger.inject_lambda_context
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    detail = event.get("detail") or {}
    if detail.get("lastStatus") != "STOPPED":
        return {"job_id": None, "state": None}
    s = runtime.services()
    command: list[str] = []
    for override in (detail.get("overrides") or {}).get("containerOverrides", []):
        command = override.get("command") or command
    started_by = str(detail.get("startedBy", ""))
    job_id = _arg(command, "--job-id") or (started_by[4:] if started_by.startswith("job-") else None)
    bucket = _arg(command, "--bucket") or s.settings.jobs.bucket
    if not job_id or not bucket:
        logger.warning("stopped task names no job", extra={"task": detail.get("taskArn")})
        return {"job_id": None, "state": None}
    exits = [c.get("exitCode") for c in detail.get("containers", [])]
    reason = describe(detail)
    if exits and all(code == 0 for code in exits):
        reason = f"the GPU task exited without finishing the job ({reason})"
    m = s.jobs.task_stopped(bucket, job_id, str(detail.get("taskArn", "")), reason)
    if m is None:
        logger.warning("stopped task's job has no manifest", extra={"job_id": job_id, "bucket": bucket})
        return {"job_id": job_id, "state": None}
    if m.state == JobState.FAILED:
        metrics.add_metric(name="GpuJobsFailed", unit=MetricUnit.Count, value=1)
    logger.info("gpu task stopped", extra={"job_id": job_id, "state": m.state.value, "reason": m.reason})
    return {"job_id": job_id, "state": m.state.value, "reason": m.reason}
