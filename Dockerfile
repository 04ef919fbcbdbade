# syntax=docker/dockerfile:1
# Targets (always pass --target: without it Docker builds the last stage, serve-gpu):
#   lambda           - the API, S3-event and worker functions: OpenVINO (mixed bf16 where the CPU has
#                      AVX-512 BF16/AMX) and ONNX Runtime (exact fp32 elsewhere), no torch
#   tools            - lambda + CPU torch/transformers/huggingface_hub: the model-sync function (fetch + ONNX export)
#   gpu              - CUDA torch for the ECS GPU task (python -m handler.gpu_task)
#   serve, serve-gpu - `similarity serve` on a CPU (OpenVINO/ONNX Runtime) or a GPU (deploy/k8s)
# The model is never baked in: it lives on EFS (/mnt/models) and is put there by the model-sync function.
# The wheel holds only the library (`similarity`); the entry points in src/handler are copied into
# each image beside it (a top-level `handler` package in the wheel would collide in any Lambda).

ARG PYTHON_VERSION=3.12

# ---------------------------------------------------------------- build the wheel once
FROM public.ecr.aws/docker/library/python:${PYTHON_VERSION}-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------- Lambda image (CPU, no torch)
FROM public.ecr.aws/lambda/python:${PYTHON_VERSION} AS lambda
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/*.whl)[onnx,openvino,lambda,cache]" && rm -rf /wheels
COPY src/handler ${LAMBDA_TASK_ROOT}/handler
# pip byte-compiled the library; the handlers need it too: Lambda's /var/task is read-only, so
# without their bytecode in the image every cold start would compile them again.
RUN python -m compileall -q ${LAMBDA_TASK_ROOT}/handler
# glibc would mmap/munmap large activation buffers on every forward; keep them in the heap.
# A sandbox loads the model once onto an empty /tmp, so OpenVINO's compiled blobs (~0.36 GB) would
# be written and never read: SIMILARITY_OV_CACHE_DIR=off (docs/performance.md, cold start).
ENV MALLOC_MMAP_THRESHOLD_=33554432 \
    MALLOC_TRIM_THRESHOLD_=8589934592 \
    OMP_NUM_THREADS=2 \
    HF_HUB_OFFLINE=1 \
    SIMILARITY_BACKEND=auto \
    SIMILARITY_OV_CACHE_DIR=off \
    CLIP_MODEL_DIR=/mnt/models/clip-vit-base-patch32
# The template sets the command per function (ImageConfig.Command); this is the default.
CMD ["handler.api.lambda_handler"]

# ---------------------------------------------------------------- model sync (needs torch for the export)
FROM lambda AS tools
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
    && pip install --no-cache-dir "transformers>=5,<6" "huggingface_hub>=0.24" "onnx>=1.16"
ENV HF_HUB_OFFLINE=0
CMD ["handler.model_sync.lambda_handler"]

# ---------------------------------------------------------------- ECS GPU task
FROM public.ecr.aws/docker/library/python:${PYTHON_VERSION}-slim AS gpu
COPY --from=wheel /wheels /wheels
# PyPI's Linux torch wheel bundles CUDA; the ECS GPU-optimised AMI supplies the driver. [lambda]:
# the task logs and reports through powertools like the functions (its tracer is off outside Lambda).
RUN pip install --no-cache-dir "torch==2.13.0" "$(ls /wheels/*.whl)[torch,cache,gpu,lambda]" && rm -rf /wheels
WORKDIR /app
COPY src/handler /app/handler
RUN python -m compileall -q /app/handler
ENV HF_HUB_OFFLINE=1 SIMILARITY_DEVICE=cuda SIMILARITY_BACKEND=torch SIMILARITY_BATCH_SIZE=128 SIMILARITY_WORKERS=32
ENTRYPOINT ["python", "-m", "handler.gpu_task"]

# ---------------------------------------------------------------- similarity serve (deploy/k8s, one box)
# The HTTP API as a long-running server: ONNX Runtime and OpenVINO on CPU, uid 10001 (the pods'
# runAsUser), the model mounted at /models. serve-gpu: the same on the gpu image's CUDA torch.
FROM public.ecr.aws/docker/library/python:${PYTHON_VERSION}-slim AS serve
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/*.whl)[serve,cpu,cache]" && rm -rf /wheels \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin similarity
ENV MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=8589934592 HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1 \
    CLIP_MODEL_DIR=/models/clip-vit-base-patch32
USER 10001
EXPOSE 8080
ENTRYPOINT ["similarity", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8080"]

FROM gpu AS serve-gpu
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/*.whl)[torch,serve]" && rm -rf /wheels \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin similarity
ENV PYTHONDONTWRITEBYTECODE=1 CLIP_MODEL_DIR=/models/clip-vit-base-patch32
USER 10001
EXPOSE 8080
ENTRYPOINT ["similarity", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8080"]
