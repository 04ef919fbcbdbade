"""Settings of the Lambda/ECS entry points, from environment variables (documented in the README).

Library settings (model, fetch limits, allow-list) come from ``similarity.settings``; this adds what
only the services need.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from similarity.settings import Settings, env_bool, env_float, env_int, env_str


@dataclass(frozen=True)
class ServiceSettings:
    core: Settings = field(default_factory=Settings)
    max_pairs: int = 64
    max_body_bytes: int = 1024 * 1024
    api_fetch_deadline: float = 10.0
    # Seconds kept back from the Lambda deadline for inference and the response.
    api_reserve_seconds: float = 4.0
    preload_model: bool = True
    # Batch pipeline (S3 drop, SQS fan-out)
    bucket: str = ""
    chunk_queue_url: str = ""
    input_prefix: str = "incoming/"
    output_prefix: str = "scored/"
    jobs_prefix: str = "jobs/"
    chunk_rows: int = 500
    gpu_min_rows: int = 200_000
    ecs_cluster: str = ""
    ecs_task_definition: str = ""
    ecs_subnets: tuple[str, ...] = ()
    ecs_security_groups: tuple[str, ...] = ()
    ecs_capacity_provider: str = ""
    ecs_container_name: str = "scorer"
    # Worker: seconds of margin before the Lambda deadline when a chunk is handed back.
    worker_reserve_seconds: float = 20.0
    # Cost estimate (USD): Lambda x86 price per GB-second and the worker's memory.
    lambda_gb_second_usd: float = 0.0000166667
    worker_memory_mb: int = 4096
    gpu_hourly_usd: float = 0.526  # g4dn.xlarge on-demand, us-east-1

    def lambda_cost_usd(self, seconds: float) -> float:
        """Compute cost of ``seconds`` of chunk-worker time (the job status and the bench use it)."""
        return seconds * self.worker_memory_mb / 1024 * self.lambda_gb_second_usd

    @classmethod
    def from_env(cls) -> ServiceSettings:
        # Services never read local files named in requests.
        core = Settings.from_env(allow_local_paths=False)
        core = dataclasses.replace(core, model_dir=env_str("CLIP_MODEL_DIR", "/mnt/models/clip-vit-base-patch32"))
        d = cls()  # each variable falls back to the field's default
        split = lambda v: tuple(x.strip() for x in v.split(",") if x.strip())  # noqa: E731
        return cls(
            core=core,
            max_pairs=env_int("MAX_PAIRS", d.max_pairs),
            max_body_bytes=env_int("MAX_BODY_BYTES", d.max_body_bytes),
            api_fetch_deadline=env_float("API_FETCH_DEADLINE", d.api_fetch_deadline),
            api_reserve_seconds=env_float("API_RESERVE_SECONDS", d.api_reserve_seconds),
            preload_model=env_bool("PRELOAD_MODEL", d.preload_model),
            bucket=env_str("BUCKET", d.bucket),
            chunk_queue_url=env_str("CHUNK_QUEUE_URL", d.chunk_queue_url),
            input_prefix=env_str("INPUT_PREFIX", d.input_prefix),
            output_prefix=env_str("OUTPUT_PREFIX", d.output_prefix),
            jobs_prefix=env_str("JOBS_PREFIX", d.jobs_prefix),
            chunk_rows=env_int("CHUNK_ROWS", d.chunk_rows),
            gpu_min_rows=env_int("GPU_MIN_ROWS", d.gpu_min_rows),
            ecs_cluster=env_str("ECS_CLUSTER", d.ecs_cluster),
            ecs_task_definition=env_str("ECS_TASK_DEFINITION", d.ecs_task_definition),
            ecs_subnets=split(env_str("ECS_SUBNETS", "")),
            ecs_security_groups=split(env_str("ECS_SECURITY_GROUPS", "")),
            ecs_capacity_provider=env_str("ECS_CAPACITY_PROVIDER", d.ecs_capacity_provider),
            ecs_container_name=env_str("ECS_CONTAINER_NAME", d.ecs_container_name),
            worker_reserve_seconds=env_float("WORKER_RESERVE_SECONDS", d.worker_reserve_seconds),
            lambda_gb_second_usd=env_float("LAMBDA_GB_SECOND_USD", d.lambda_gb_second_usd),
            worker_memory_mb=env_int("WORKER_MEMORY_MB", env_int("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", d.worker_memory_mb)),
            gpu_hourly_usd=env_float("GPU_HOURLY_USD", d.gpu_hourly_usd),
        )
