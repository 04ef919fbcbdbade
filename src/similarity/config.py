"""Every setting, declared once, read from the environment and validated at start.

Sections: ``model`` (which weights, backend and precision), ``fetch`` (limits of one image fetch),
``score`` (batching and concurrency), ``cache`` (the embedding cache), and for the services ``api`` (request limits) and ``jobs``
(the S3/SQS batch pipeline). Each field names its environment variable; the CLI lays its flags
over these (``Settings.with_overrides``). A bad value raises ``ConfigError`` naming the variable
(or the flag) and what it must be.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from .backends import BackendChoice, DeviceChoice, DtypeChoice
from .errors import ConfigError
from .fetch.guard import IPNetwork, parse_networks
from .fetch.settings import FetchSettings
from .hardware import cpu_count, memory_limit_bytes
from .model.device_pixels import PixelPath
from .model.directory import DEFAULT_MODEL_DIR, DEFAULT_MODEL_ID
from .model.preprocess import DecodeLimits

# allow_inf_nan=False: "inf" passes any bound from below, then overflows a timer or int() far
# from the variable that caused it.
_CONFIG = SettingsConfigDict(
    populate_by_name=True, frozen=True, env_ignore_empty=True, extra="ignore", allow_inf_nan=False
)


class _StrippedEnv(EnvSettingsSource):
    """Values are stripped, and a blank variable means the default (as an unset one does)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k: v.strip() for k, v in super()._load_env_vars().items() if v is not None and v.strip()}


class Section(BaseSettings):
    """A group of settings read from the environment: only from init values and variables."""

    model_config = _CONFIG

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _StrippedEnv(settings_cls)


def _split(value: Any) -> Any:
    return tuple(x.strip() for x in value.split(",") if x.strip()) if isinstance(value, str) else value


class ModelSettings(Section):
    dir: str = Field(DEFAULT_MODEL_DIR, validation_alias="CLIP_MODEL_DIR")
    backend: BackendChoice = Field("auto", validation_alias="SIMILARITY_BACKEND")
    device: DeviceChoice = Field("auto", validation_alias="SIMILARITY_DEVICE")
    dtype: DtypeChoice = Field("auto", validation_alias="SIMILARITY_DTYPE")
    #: Inference threads (default: every core the process may use).
    threads: int | None = Field(None, ge=1, validation_alias="SIMILARITY_THREADS")
    #: Batch parts run at once (default: one per thread).
    streams: int | None = Field(None, ge=1, validation_alias="SIMILARITY_STREAMS")
    #: Where OpenVINO keeps its compiled graphs, one subdirectory per OpenVINO version and CPU type,
    #: and the cut graphs when `model export` did not write them (default: beside the ONNX files,
    #: else a temporary directory); ``off`` caches nothing (a process that loads once on an empty
    #: disk, like a Lambda sandbox, only pays for writing them).
    ov_cache_dir: str | None = Field(None, validation_alias="SIMILARITY_OV_CACHE_DIR")
    #: Opt-in JPEG draft decoding: decode large JPEGs at a reduced DCT scale while the short side
    #: stays at least this many times the model's input; 0 (the default) is off. It moves
    #: similarities by up to 0.015-0.023 at 2 and 0.004-0.007 at 3-4 on the test model
    #: (docs/performance.md).
    jpeg_draft: int = Field(0, ge=0, le=64, validation_alias="SIMILARITY_JPEG_DRAFT")
    #: Where image bytes become model input: ``pillow`` (the CPU); ``torch``: Pillow decodes, the
    #: model's device resizes, crops and normalises, to the bit as ``pillow`` (for a GPU host whose
    #: CPU is the limit); ``nvjpeg``: JPEGs are decoded on the GPU too (other pixels; opt-in).
    pixels: PixelPath = Field("pillow", validation_alias="SIMILARITY_PIXELS")


class FetchConfig(Section):
    connect_timeout: float = Field(5.0, gt=0, validation_alias="SIMILARITY_CONNECT_TIMEOUT")
    read_timeout: float = Field(10.0, gt=0, validation_alias="SIMILARITY_READ_TIMEOUT")
    deadline: float = Field(30.0, gt=0, validation_alias="SIMILARITY_FETCH_DEADLINE")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, validation_alias="SIMILARITY_MAX_IMAGE_BYTES")
    max_retries: int = Field(2, ge=0, validation_alias="SIMILARITY_MAX_RETRIES")
    per_host: int = Field(8, ge=1, validation_alias="SIMILARITY_PER_HOST")
    #: None: the entry point decides (the CLI reads local paths, the services never do).
    allow_local_paths: bool | None = Field(None, validation_alias="SIMILARITY_ALLOW_LOCAL_PATHS")
    allowed_networks: Annotated[tuple[str, ...], NoDecode] = Field((), validation_alias="SIMILARITY_ALLOWED_NETWORKS")
    #: The memory decode limits are sized to (default: the cgroup's limit or the machine's memory;
    #: in Lambda the function's memory size).
    memory_mb: int | None = Field(
        None, ge=128, validation_alias=AliasChoices("SIMILARITY_MEMORY_MB", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
    )
    #: Pixels one image may declare (default: 89.5 MP, less where memory is short).
    max_image_pixels: int | None = Field(None, ge=1, validation_alias="SIMILARITY_MAX_IMAGE_PIXELS")
    #: Megapixels all decode threads may hold at once (default: a quarter of the memory at 5 bytes
    #: a pixel, at most two 89.5 MP images per core; modes that need conversion count more).
    decode_budget_mp: float | None = Field(None, gt=0, validation_alias="SIMILARITY_DECODE_BUDGET_MP")

    @field_validator("allowed_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("allowed_networks")
    @classmethod
    def _valid_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        parse_networks(value)  # raises ValueError naming the bad entry
        return value

    def networks(self) -> tuple[IPNetwork, ...]:
        return parse_networks(self.allowed_networks)

    def decode_limits(self) -> DecodeLimits:
        memory = self.memory_mb * 1024 * 1024 if self.memory_mb is not None else memory_limit_bytes()
        return DecodeLimits.for_memory(memory, self.max_image_pixels, self.decode_budget_mp, cores=cpu_count())

    def fetch_settings(self, allow_local_paths: bool, pool_size: int) -> FetchSettings:
        return FetchSettings(
            connect_timeout=self.connect_timeout,
            read_timeout=min(self.read_timeout, self.deadline),
            deadline=self.deadline,
            max_bytes=self.max_image_bytes,
            max_retries=self.max_retries,
            per_host=self.per_host,
            pool_size=max(32, pool_size),
            allow_local_paths=allow_local_paths if self.allow_local_paths is None else self.allow_local_paths,
        )


class ScoreSettings(Section):
    batch_size: int = Field(32, ge=1, le=4096, validation_alias="SIMILARITY_BATCH_SIZE")
    #: Concurrent image fetches and decodes.
    workers: int = Field(16, ge=1, le=1024, validation_alias="SIMILARITY_WORKERS")
    #: Worker processes that fetch and decode (the workers' fetches spread over them); 0: threads
    #: of this process. For hosts with many cores beside a GPU (pipeline.processes).
    processes: int = Field(0, ge=0, le=256, validation_alias="SIMILARITY_PROCESSES")
    excel_safe: bool = Field(False, validation_alias="SIMILARITY_EXCEL_SAFE")
    #: A file output's rows are committed (flushed, fsync'd) after this many rows or seconds,
    #: whichever comes first: what a crash can lose and ``--resume`` scores again.
    commit_rows: int = Field(1000, ge=1, validation_alias="SIMILARITY_COMMIT_ROWS")
    commit_seconds: float = Field(5.0, gt=0, validation_alias="SIMILARITY_COMMIT_SECONDS")


#: SIMILARITY_CACHE words: what turns the cache off, and what picks the local store.
_CACHE_OFF = frozenset({"off", "none", "no", "false", "0"})
_CACHE_LOCAL = frozenset({"local", "on", "yes", "true", "1", "sqlite"})
_CACHE_URLS = ("sqlite:///", "redis://", "rediss://", "unix://")


class CacheConfig(Section):
    """The embedding cache (similarity.cache). ``store``: empty means the entry point's default
    (the CLI: ``local``; the library and the services: ``off``)."""

    store: str = Field("", validation_alias="SIMILARITY_CACHE")
    #: Seconds a URL's last check is trusted without a request (default: always revalidate).
    ttl: float | None = Field(None, ge=0, validation_alias="SIMILARITY_CACHE_TTL")
    #: Where the local store lives (default: the user's cache directory).
    dir: str | None = Field(None, validation_alias="SIMILARITY_CACHE_DIR")
    max_bytes: int = Field(1024**3, ge=1024 * 1024, validation_alias="SIMILARITY_CACHE_MAX_BYTES")
    dtype: Literal["float32", "float16"] = Field("float32", validation_alias="SIMILARITY_CACHE_DTYPE")
    #: Seconds per store call (connect and each read).
    timeout: float = Field(0.25, gt=0, le=10, validation_alias="SIMILARITY_CACHE_TIMEOUT")
    #: Redis: every entry's expiry in seconds.
    entry_ttl: int = Field(30 * 86400, ge=60, validation_alias="SIMILARITY_CACHE_ENTRY_TTL")

    @field_validator("store")
    @classmethod
    def _valid_store(cls, value: str) -> str:
        word = value.strip()
        if not word:
            return ""
        if word.lower() in _CACHE_OFF:
            return "off"
        if word.lower() in _CACHE_LOCAL:
            return "local"
        if word.lower().startswith(_CACHE_URLS):
            scheme, _, rest = word.partition(":")
            url = f"{scheme.lower()}:{rest}"  # the stores match the scheme as written
            try:
                urlsplit(url).port  # noqa: B018 - parsing it is the check
            except ValueError as exc:
                raise ValueError(f"{url!r} cannot be parsed ({exc})") from None
            if url.startswith("sqlite:") and not urlsplit(url).path.strip("/"):
                raise ValueError("sqlite:///PATH needs a file path")
            return url
        raise ValueError(
            "must be off, local, sqlite:///PATH, redis://HOST:PORT[/DB], rediss://HOST:PORT or unix://PATH"
        )


class ApiSettings(Section):
    max_pairs: int = Field(64, ge=1, validation_alias="MAX_PAIRS")
    max_body_bytes: int = Field(1024 * 1024, ge=1024, validation_alias="MAX_BODY_BYTES")
    fetch_deadline: float = Field(10.0, gt=0, validation_alias="API_FETCH_DEADLINE")
    #: Seconds kept back from the request's deadline for inference and the response.
    reserve_seconds: float = Field(4.0, ge=0, validation_alias="API_RESERVE_SECONDS")
    preload_model: bool = Field(True, validation_alias="PRELOAD_MODEL")


class JobSettings(Section):
    bucket: str = Field("", validation_alias="BUCKET")
    chunk_queue_url: str = Field("", validation_alias="CHUNK_QUEUE_URL")
    #: The function ``POST /jobs`` hands a start to (asynchronous invoke), so a large file is split
    #: outside API Gateway's 29 s; empty: the API splits it itself (local and tests).
    splitter_function: str = Field("", validation_alias="SPLITTER_FUNCTION")
    input_prefix: str = Field("incoming/", validation_alias="INPUT_PREFIX")
    output_prefix: str = Field("scored/", validation_alias="OUTPUT_PREFIX")
    jobs_prefix: str = Field("jobs/", validation_alias="JOBS_PREFIX")
    chunk_rows: int = Field(500, ge=1, validation_alias="CHUNK_ROWS")
    gpu_min_rows: int = Field(200_000, ge=0, validation_alias="GPU_MIN_ROWS")
    ecs_cluster: str = Field("", validation_alias="ECS_CLUSTER")
    ecs_task_definition: str = Field("", validate_default=True, validation_alias="ECS_TASK_DEFINITION")
    ecs_subnets: Annotated[tuple[str, ...], NoDecode] = Field((), validate_default=True, validation_alias="ECS_SUBNETS")
    ecs_security_groups: Annotated[tuple[str, ...], NoDecode] = Field((), validation_alias="ECS_SECURITY_GROUPS")
    ecs_capacity_provider: str = Field("", validation_alias="ECS_CAPACITY_PROVIDER")
    ecs_container_name: str = Field("scorer", validation_alias="ECS_CONTAINER_NAME")
    #: Seconds of margin before the Lambda deadline when a chunk is handed back.
    worker_reserve_seconds: float = Field(20.0, ge=0, validation_alias="WORKER_RESERVE_SECONDS")
    #: Seconds until a chunk handed back at the deadline is received again (not the queue's 30 min).
    handback_seconds: int = Field(5, ge=0, le=43200, validation_alias="WORKER_HANDBACK_SECONDS")
    #: Seconds until a chunk whose attempt failed is received again (each receive counts towards the DLQ).
    retry_seconds: int = Field(60, ge=0, le=43200, validation_alias="WORKER_RETRY_SECONDS")
    #: Starts of one job (the S3 event and Lambda's retries of it) before an error fails the job:
    #: 1 + the S3 event function's MaximumRetryAttempts.
    start_attempts: int = Field(3, ge=1, le=100, validation_alias="JOB_START_ATTEMPTS")
    #: A job still 'splitting' this long after its last write has no start running any more (each
    #: was killed: out of time or memory): its status fails it. More than the splitter's 900 s
    #: timeout plus Lambda's waits between retries.
    start_timeout_seconds: int = Field(1200, ge=60, validation_alias="JOB_START_TIMEOUT_SECONDS")
    #: Part size of the streamed multipart upload of merged outputs (memory held per upload).
    merge_part_mb: int = Field(8, ge=5, le=5120, validation_alias="MERGE_PART_MB")
    #: Most rows a job may have on the Lambda path (no GPU path configured): a bigger file fails at
    #: the split with the reason, instead of a merge that cannot finish in the worker's timeout
    #: (bench/jobs.py measures what fits).
    lambda_max_rows: int = Field(2_000_000, ge=1, validation_alias="LAMBDA_MAX_ROWS")
    #: Cost estimate (USD): Lambda x86 price per GB-second and the worker's memory.
    lambda_gb_second_usd: float = Field(0.0000166667, ge=0, validation_alias="LAMBDA_GB_SECOND_USD")
    worker_memory_mb: int = Field(
        4096, ge=128, validation_alias=AliasChoices("WORKER_MEMORY_MB", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
    )
    gpu_hourly_usd: float = Field(0.526, ge=0, validation_alias="GPU_HOURLY_USD")  # g4dn.xlarge, us-east-1

    @field_validator("ecs_subnets", "ecs_security_groups", mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        return _split(value)

    # Half a GPU configuration would only show at the first large file: without the task
    # definition every file silently takes the Lambda path; without subnets RunTask fails there.
    @field_validator("ecs_task_definition")
    @classmethod
    def _cluster_and_task_together(cls, value: str, info: ValidationInfo) -> str:
        if bool(value) != bool(info.data.get("ecs_cluster")):
            raise ValueError("ECS_CLUSTER and ECS_TASK_DEFINITION are set together (the GPU path) or not at all")
        return value

    @field_validator("ecs_subnets")
    @classmethod
    def _gpu_needs_subnets(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if info.data.get("ecs_cluster") and info.data.get("ecs_task_definition") and not value:
            raise ValueError("the GPU path (ECS_CLUSTER) needs the task's subnets, comma-separated")
        return value

    @property
    def gpu_enabled(self) -> bool:
        return bool(self.ecs_cluster and self.ecs_task_definition)

    def lambda_cost_usd(self, seconds: float) -> float:
        """Compute cost of ``seconds`` of chunk-worker time."""
        return seconds * self.worker_memory_mb / 1024 * self.lambda_gb_second_usd


class ModelSyncSettings(Section):
    """What the model-sync function puts on the model volume."""

    model_id: str = Field(DEFAULT_MODEL_ID, validation_alias="MODEL_ID")
    revision: str | None = Field(None, validation_alias="MODEL_REVISION")
    #: An s3://bucket/prefix holding a model directory, used instead of the hub when set.
    source_s3_uri: str = Field("", validation_alias="MODEL_SOURCE_S3_URI")


class EngineSettings(Section):
    """What the engine adapters (Spark, Ray, Snowpark) read on each worker process."""

    #: Where a model from an s3:// prefix or a staged zip is unpacked, once per node (default: a
    #: ``similarity-models`` directory in the system's temporary directory).
    model_cache_dir: str | None = Field(None, validation_alias="SIMILARITY_ENGINE_MODEL_CACHE")
    #: A directory where each model load writes one JSON record (pid, model, seconds): a count of
    #: loads per worker process that survives the process.
    load_log_dir: str | None = Field(None, validation_alias="SIMILARITY_ENGINE_LOAD_LOG")


class LogSettings(Section):
    """The CLI's log level (the services log through powertools or ``SERVER_LOG_LEVEL``)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("WARNING", validation_alias="SIMILARITY_LOG_LEVEL")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class Settings(Section):
    """The library's and the CLI's settings."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    score: ScoreSettings = Field(default_factory=ScoreSettings)
    cache: CacheConfig = Field(default_factory=CacheConfig)

    def with_overrides(self, section: str, values: dict[str, Any], flags: dict[str, str] | None = None) -> Settings:
        """A copy with some fields of one section replaced (``None`` values are ignored), validated
        like the environment's. ``flags`` maps a field to the CLI flag that set it, for messages."""
        current = getattr(self, section)
        given = {k: v for k, v in values.items() if v is not None}
        replaced = validated(type(current), {**current.model_dump(), **given}, flags or {})
        return self.model_copy(update={section: replaced})


class ServiceSettings(Settings):
    """What the Lambda functions, the ECS task and the server read: the library's settings plus the
    API's limits and the batch pipeline's resources."""

    api: ApiSettings = Field(default_factory=ApiSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)


class ServerSettings(Section):
    """``similarity serve``: the HTTP API as a long-running server (FastAPI under uvicorn)."""

    host: str = Field("127.0.0.1", min_length=1, validation_alias="SERVER_HOST")
    port: int = Field(8080, ge=0, le=65535, validation_alias="SERVER_PORT")
    #: Server processes, each with its own model and batcher (Kubernetes: keep 1, scale pods).
    workers: int = Field(1, ge=1, le=64, validation_alias="SERVER_WORKERS")
    #: Seconds a request may take from arrival to answer (what API Gateway's 30 s is to the Lambda).
    request_timeout: float = Field(30.0, gt=0, validation_alias="SERVER_REQUEST_TIMEOUT")
    #: How long the batcher waits for more rows before it runs a batch that is not full.
    batch_wait_ms: float = Field(5.0, ge=0, le=1000, validation_alias="SERVER_BATCH_WAIT_MS")
    #: Rows admitted at once (fetching or waiting for the model); more answer 503 overloaded.
    max_queue_rows: int = Field(1024, ge=1, validation_alias="SERVER_MAX_QUEUE_ROWS")
    #: Requests handled at once (threads waiting on the batcher); more wait for a slot.
    max_concurrency: int = Field(256, ge=1, validation_alias="SERVER_MAX_CONCURRENCY")
    #: Seconds in-flight requests get to finish after SIGTERM (keep below the pod's grace period).
    graceful_timeout: float = Field(25.0, ge=0, validation_alias="SERVER_GRACEFUL_TIMEOUT")
    #: Bearer token required on /score and /jobs (off when neither this nor the file is set).
    auth_token: SecretStr | None = Field(None, validation_alias="SERVER_AUTH_TOKEN")
    auth_token_file: str | None = Field(None, validation_alias="SERVER_AUTH_TOKEN_FILE")
    #: Largest |cosine change| of the /readyz canary against the value recorded at model load.
    canary_tolerance: float = Field(1e-3, gt=0, validation_alias="SERVER_CANARY_TOLERANCE")
    #: Seconds a canary result is reused by later /readyz calls (probes from several kubelets).
    canary_interval: float = Field(5.0, ge=0, validation_alias="SERVER_CANARY_INTERVAL")
    #: Seconds between attempts when the model fails to load (a volume still being filled).
    load_retry_seconds: float = Field(30.0, gt=0, validation_alias="SERVER_LOAD_RETRY_SECONDS")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", validation_alias="SERVER_LOG_LEVEL")
    #: The model's name on the Open Inference Protocol routes (``/v2/models/{name}/infer``).
    model_name: str = Field("clip", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", validation_alias="SERVER_MODEL_NAME")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    def token(self) -> str | None:
        """The bearer token, read from ``SERVER_AUTH_TOKEN_FILE`` or ``SERVER_AUTH_TOKEN``; None: off."""
        if self.auth_token is not None and self.auth_token_file:
            raise ConfigError("SERVER_AUTH_TOKEN and SERVER_AUTH_TOKEN_FILE: set one, not both")
        if self.auth_token_file:
            try:
                token = Path(self.auth_token_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"SERVER_AUTH_TOKEN_FILE: cannot read {self.auth_token_file!r} ({exc.strerror})"
                ) from None
            where = "SERVER_AUTH_TOKEN_FILE"
        elif self.auth_token is not None:
            token, where = self.auth_token.get_secret_value().strip(), "SERVER_AUTH_TOKEN"
        else:
            return None
        if len(token) < 16 or any(c.isspace() for c in token):
            raise ConfigError(f"{where}: the token must be at least 16 characters without spaces")
        return token


class ServeSettings(ServiceSettings):
    """What ``similarity serve`` reads: the services' settings plus the server's."""

    server: ServerSettings = Field(default_factory=ServerSettings)


S = TypeVar("S", bound=BaseSettings)


def validated(cls: type[S], values: dict[str, Any] | None = None, flags: dict[str, str] | None = None) -> S:
    """``cls(**values)`` (the rest from the environment), with errors as ``ConfigError`` naming the
    environment variable a bad value came from, or the CLI flag (``flags``: field -> flag)."""
    try:
        return cls(**(values or {}))
    except ValidationError as exc:
        raise ConfigError(describe(exc, cls, flags or {})) from None


def env_name(cls: type[BaseSettings], field: str) -> str:
    """The variable a field is read from: of several, the first one set (the one that was read)."""
    alias = cls.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        names = [str(c) for c in alias.choices]
        return next((n for n in names if os.environ.get(n, "").strip()), names[0])
    return str(alias or field)


def _field_of_alias(cls: type[BaseSettings], name: str) -> str | None:
    for field, info in cls.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices) and name in [str(c) for c in alias.choices]:
            return field
    return None


def describe(exc: ValidationError, cls: type[BaseSettings], flags: dict[str, str]) -> str:
    parts = []
    for err in exc.errors():
        name = str(err["loc"][-1]) if err["loc"] else "settings"
        if name in flags:
            where = flags[name]
        elif name in cls.model_fields:
            where = env_name(cls, name)
        elif (field := _field_of_alias(cls, name)) is not None:
            where = env_name(cls, field)  # pydantic names the first of several variables
        else:
            where = name  # already the variable's name: it came from the environment
        value = err.get("input")
        shown = f" (got {value!r})" if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
        parts.append(f"{where}: {err['msg']}{shown}")
    return "; ".join(parts)


def load(cls: type[S]) -> S:
    """Read and validate ``cls`` and each of its sections from the environment."""
    sections: dict[str, Any] = {}
    for name, field in cls.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseSettings):
            sections[name] = validated(section)
    return validated(cls, sections)
