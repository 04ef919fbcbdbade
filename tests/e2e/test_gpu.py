"""The CUDA path (torch fp16): what `auto` picks on a GPU, parity with the CPU fp32 reference, and
the ECS GPU task end to end against moto's S3. These run only where torch sees a CUDA device; CI
has none, so they skip there (README, "GPU path", says where they last ran and what they gave)."""

from __future__ import annotations

import csv
import importlib.util
import io
import random

import numpy as np
import pytest

from support.imageserver import png_bytes
from support.parity import parity_inputs, similarities
from support.shapes import COLOURS, SHAPES, draw


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="no CUDA device")]


@pytest.fixture(scope="module")
def cuda_model(tiny_clip_dir):
    from similarity.model import load_model

    return load_model(tiny_clip_dir)  # auto: must be CUDA fp16 here


def test_auto_picks_cuda_fp16(cuda_model, tiny_clip_dir) -> None:
    from similarity.model import resolve

    assert resolve("auto", "auto", tiny_clip_dir).as_dict() == {"backend": "torch", "device": "cuda", "dtype": "fp16"}
    assert (cuda_model.info.backend, cuda_model.info.device, cuda_model.info.dtype) == ("torch", "cuda", "fp16")
    assert next(cuda_model.backend.model.parameters()).is_cuda


def test_cuda_fp16_agrees_with_cpu_fp32(cuda_model, tiny_model) -> None:
    """The 0.002 rule for `auto`, on the test bed: a batch of 24 images and 14 captions of mixed
    lengths (one truncated), and a single row."""
    px, caps = parity_inputs(tiny_model.preprocess)
    ref = similarities(tiny_model, px, caps)
    assert np.abs(similarities(cuda_model, px, caps) - ref).max() <= 0.002
    one = (cuda_model.embed_images(px[:1]) @ cuda_model.embed_texts(caps[:1])[0].T + 1) / 2
    assert abs(float(one[0, 0]) - float(ref[0, 0])) <= 0.002


def _rows(server, forbidden_server, n: int = 70) -> str:
    rng = random.Random(5)
    urls = [server.image(f"/gpu/{i}.png", png_bytes(draw(list(COLOURS)[i % 4], SHAPES[i % 3], rng))) for i in range(9)]
    bad, blocked = server.status("/gpu/missing.png", 404), forbidden_server.image("/gpu/internal.png", b"x")
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["id", "url", "caption"])
    for i in range(n):
        url = {5: bad, 7: blocked}.get(i % 11, urls[i % len(urls)])
        w.writerow([str(i), url, "" if i % 13 == 4 else f"a {list(COLOURS)[i % 4]} {SHAPES[i % 3]}"])
    return buf.getvalue()


def test_gpu_task_on_cuda_matches_cpu(
    monkeypatch, tmp_path, moto_endpoint, s3, bucket, server, forbidden_server, tiny_clip_dir
) -> None:
    """The ECS task's own entry point, on the GPU, against S3 on moto: every row, in order, the same
    errors as the CPU CLI and similarities within 0.002 of it."""
    from handler import runtime
    from handler.gpu_task import main as gpu_main
    from similarity.cli import main as cli_main

    body = _rows(server, forbidden_server)
    s3.put_object(Bucket=bucket, Key="incoming/big.csv", Body=body.encode())
    for k, v in {
        "CLIP_MODEL_DIR": str(tiny_clip_dir),
        "SIMILARITY_ALLOWED_NETWORKS": "127.0.0.1/32",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "PRELOAD_MODEL": "0",
    }.items():
        monkeypatch.setenv(k, v)
    runtime.reset()
    try:
        assert (
            gpu_main(["--bucket", bucket, "--input-key", "incoming/big.csv", "--output-key", "scored/big_scored.csv"])
            == 0
        )
        assert runtime.services().run.model.info.device == "cuda"
    finally:
        runtime.reset()
    gpu = list(
        csv.reader(
            io.StringIO(s3.get_object(Bucket=bucket, Key="scored/big_scored.csv")["Body"].read().decode(), newline="")
        )
    )
    (tmp_path / "in.csv").write_text(body, newline="")
    assert (
        cli_main(
            [
                "score",
                str(tmp_path / "in.csv"),
                "-o",
                str(tmp_path / "cpu.csv"),
                "--model",
                str(tiny_clip_dir),
                "--device",
                "cpu",
                "--dtype",
                "fp32",
                "--allow-network",
                "127.0.0.1/32",
                "--no-progress",
            ]
        )
        == 0
    )
    cpu = list(csv.reader(io.StringIO((tmp_path / "cpu.csv").read_text(), newline="")))
    assert len(gpu) == len(cpu) == 71 and gpu[0] == cpu[0]
    col = {name: i for i, name in enumerate(cpu[0])}
    for g, c in zip(gpu[1:], cpu[1:]):
        assert g[0] == c[0] and g[col["error"]] == c[col["error"]]
        if c[col["similarity"]]:
            assert abs(float(g[col["similarity"]]) - float(c[col["similarity"]])) <= 0.0021  # 4 decimals each
    codes = {r[col["error"]].split(":")[0] for r in gpu[1:] if r[col["error"]]}
    assert codes == {"http_404", "blocked_address", "missing_caption"}
    assert forbidden_server.hits["/gpu/internal.png"] == 0


def test_torch_pixels_on_the_gpu_are_pillows_to_the_bit(tiny_clip_dir) -> None:
    """The resize's float64 integer arithmetic is exact on any device: the GPU gives Pillow's bytes."""
    from similarity.model.device_pixels import DevicePixels
    from similarity.model.preprocess import PreprocessConfig, load_pixels
    from support.parity import large_images

    cfg = PreprocessConfig.from_model_dir(tiny_clip_dir)
    dp = DevicePixels(cfg, "cuda")
    for data in large_images(64):
        assert np.array_equal(dp(data), load_pixels(data, cfg))


def test_nvjpeg_pixels_score_within_the_bed_bound(tiny_clip_dir) -> None:
    """nvJPEG decodes the test bed's JPEGs on the GPU. Its pixels are not libjpeg-turbo's, so the
    similarities are held to 0.01 only: that catches a wrong decode (channels, orientation, a shifted
    grid), not the drift itself, which bench/gpu.py prints."""
    pytest.importorskip("nvidia.nvimgcodec")
    from similarity.model import load_model
    from support.parity import large_images

    ref = load_model(tiny_clip_dir, backend="torch", device="cuda", dtype="fp32")
    nv = load_model(tiny_clip_dir, backend="torch", device="cuda", dtype="fp32", pixels="nvjpeg")
    files = large_images(64)
    caps = parity_inputs(ref.preprocess)[1]
    want = similarities(ref, np.stack([ref.pixels(f) for f in files]), caps)
    got = similarities(nv, np.stack([nv.pixels(f) for f in files]), caps)
    assert nv.device_pixels.decoded_on_device >= 48
    assert float(np.abs(got - want).max()) < 0.01
