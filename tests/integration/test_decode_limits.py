"""Memory that untrusted images control: the decode budget shared by the decode threads, limits
sized to the process's memory, and what extreme aspect ratios cost the trained tiny model.

The peak memory of 24 different 9000x9000 PNGs under the services' settings is measured by
bench/hostile.py (memory targets live in bench/, not in tests).
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import similarity.model.preprocess as pre
from similarity import Record, score_pairs
from similarity.bootstrap import build
from similarity.config import ServiceSettings, Settings, load
from similarity.errors import ConfigError, TooManyPixels
from similarity.hardware import cpu_count, memory_limit_bytes
from similarity.model.preprocess import DecodeBudget, DecodeLimits, PreprocessConfig, preprocess, set_decode_limits
from support.imageserver import banded_png, huge_png_header, png_bytes
from support.shapes import COLOURS, SHAPES, all_captions, draw

MIB = 1024 * 1024


@pytest.fixture
def restore_limits():
    yield
    set_decode_limits(DecodeLimits.for_memory(memory_limit_bytes()))


# ------------------------------------------------------------------ limits from memory
@pytest.mark.parametrize("memory_mb", [512, 1024, 2048, 3008, 4096, 10240, 14000])
def test_limits_fit_the_memory(memory_mb) -> None:
    memory = memory_mb * MIB
    lim = DecodeLimits.for_memory(memory)
    worst = pre.BYTES_PER_PIXEL * max(pre.ALPHA_WEIGHT, pre.WIDE_WEIGHT, *pre.MODE_WEIGHT.values())
    assert lim.max_pixels * worst <= memory / 2  # one image at the limit, in its costliest mode
    assert lim.budget_megapixels * 1e6 * pre.BYTES_PER_PIXEL <= memory / 4 + 1  # everything in flight
    assert lim.max_pixels <= pre.DEFAULT_MAX_PIXELS


def test_the_budget_keeps_to_what_the_cores_can_decode() -> None:
    """A 23 GB machine with 2 cores: a quarter of the memory would let 14 large images decode at
    once (the CLI peaked at 5.3 GB) where 2 cores decode 2 at a time."""
    big = DecodeLimits.for_memory(23 * 1024 * MIB, cores=2)
    assert big.budget_megapixels == pytest.approx(2 * 2 * pre.DEFAULT_MAX_PIXELS / 1e6)
    assert DecodeLimits.for_memory(23 * 1024 * MIB, cores=64).budget_megapixels == pytest.approx(23 * 1024 * MIB / 20e6)
    assert DecodeLimits.for_memory(4096 * MIB, cores=2).budget_megapixels == pytest.approx(4096 * MIB / 20e6)
    assert DecodeLimits.for_memory(23 * 1024 * MIB, budget_megapixels=5000, cores=2).budget_megapixels == 5000


def test_the_services_limits_come_from_their_memory(monkeypatch, restore_limits) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "4096")  # the API and the chunk workers
    lim = load(ServiceSettings).fetch.decode_limits()
    by_memory = 4096 * MIB / 4 / pre.BYTES_PER_PIXEL / 1e6  # 215 MP: two 9000x9000 RGB images
    by_cores = pre.DECODES_PER_CORE * cpu_count() * pre.DEFAULT_MAX_PIXELS / 1e6
    assert lim.max_pixels == pre.DEFAULT_MAX_PIXELS and lim.budget_megapixels == pytest.approx(min(by_memory, by_cores))
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
    small = load(ServiceSettings)
    lim = small.fetch.decode_limits()
    assert lim.max_pixels == 1024 * MIB // 2 // 20 and lim.budget_megapixels < 60
    build(small, local_paths=False)  # applies them to this process's decodes
    with pytest.raises(TooManyPixels, match=f"limit of {lim.max_pixels}"):
        pre.load_pixels(huge_png_header(6000, 5000), PreprocessConfig())
    monkeypatch.setenv("SIMILARITY_MAX_IMAGE_PIXELS", "1000")
    monkeypatch.setenv("SIMILARITY_DECODE_BUDGET_MP", "12.5")
    lim = load(Settings).fetch.decode_limits()
    assert (lim.max_pixels, lim.budget_megapixels) == (1000, 12.5)
    monkeypatch.setenv("SIMILARITY_MEMORY_MB", "2048")
    assert load(Settings).fetch.memory_mb == 2048


@pytest.mark.parametrize(
    ("name", "value"), [("SIMILARITY_DECODE_BUDGET_MP", "0"), ("SIMILARITY_MAX_IMAGE_PIXELS", "x")]
)
def test_bad_limits_are_named(monkeypatch, name, value) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"{name}: "):
        load(Settings)


def test_memory_limit_reads_cgroup_files(tmp_path) -> None:
    physical = memory_limit_bytes(tmp_path / "nothing-here")
    assert physical >= 256 * MIB
    (tmp_path / "memory.max").write_text("1073741824\n")
    assert memory_limit_bytes(tmp_path) == min(physical, 1 << 30)
    (tmp_path / "memory.max").write_text("max\n")  # v2 without a limit
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(str(512 * MIB))
    assert memory_limit_bytes(tmp_path) == min(physical, 512 * MIB)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712")  # v1's "no limit"
    assert memory_limit_bytes(tmp_path) == physical


# ------------------------------------------------------------------ the budget
def test_budget_bounds_what_is_held_at_once() -> None:
    budget = DecodeBudget(megapixels=10)
    held = 0
    most = 0
    lock = threading.Lock()

    def decode(cost: int) -> None:
        nonlocal held, most
        with budget.hold(cost):
            with lock:
                held += min(cost, budget.capacity)
                most = max(most, held)
            time.sleep(0.01)
            with lock:
                held -= min(cost, budget.capacity)

    costs = [4_000_000, 3_000_000, 6_000_000, 1_000_000, 25_000_000, 2_000_000] * 4  # one over the whole budget
    threads = [threading.Thread(target=decode, args=(c,)) for c in costs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)  # no waiter left behind, the oversized one ran
    assert most <= budget.capacity and budget.peak <= budget.capacity and budget.in_use == 0
    assert most > 6_000_000  # decodes did overlap: the bound was what held them back


def _oriented(fmt: str, orientation: int | None, size: tuple[int, int] = (300, 200)) -> bytes:
    img = Image.new("RGB", size, (200, 30, 30))
    img.paste((20, 20, 200), (0, 0, size[0] // 3, size[1] // 2))
    if orientation is None:
        return png_bytes(img, fmt)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return png_bytes(img, fmt, exif=exif.tobytes())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_an_exif_rotation_counts_its_transposed_copy(fmt) -> None:
    """exif_transpose holds the decoded image and its transposed copy at once (a 48 MP JPEG
    rotated by its EXIF peaked at 385 MB against 201 MB upright): twice the cost of RGB."""
    cfg = PreprocessConfig(max_pixels=10**8)
    upright = pre.decode_cost(pre.open_image(_oriented(fmt, 1), cfg))
    assert upright == 300 * 200
    for orientation in range(2, 9):
        im = pre.open_image(_oriented(fmt, orientation), cfg)
        loads = _count_loads(im)
        assert pre.decode_cost(im) == upright + 300 * 200, orientation
        assert not loads  # reading the orientation decoded nothing
        out = pre.load_rgb(im)  # and the EXIF read then is what exif_transpose applies
        assert out.size == ((200, 300) if orientation >= 5 else (300, 200))


@pytest.mark.parametrize(("mode", "weight"), [("L", 1), ("P", 1), ("CMYK", 2), ("RGBA", 4), ("I;16", 2), ("F", 4)])
def test_a_rotation_costs_nothing_more_where_conversion_costs_more(mode, weight) -> None:
    """The transpose ends before the conversion starts: the costlier step counts, not their sum."""
    img = Image.new(mode, (300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = png_bytes(img, "JPEG" if mode in ("L", "CMYK") else "TIFF", exif=exif.tobytes())
    im = pre.open_image(data, PreprocessConfig(max_pixels=10**8))
    assert im.mode == mode
    assert pre.decode_cost(im) == 300 * 200 * weight
    assert pre.load_rgb(im).size == (200, 300)


def test_the_budget_holds_the_rotated_cost() -> None:
    budget = DecodeBudget(megapixels=1000)
    cfg = PreprocessConfig(max_pixels=10**8)
    pre.load_pixels(_oriented("JPEG", 6), cfg, budget=budget)
    assert budget.peak == 2 * 300 * 200 and budget.in_use == 0


def _count_loads(im: Image.Image) -> list[int]:
    loads: list[int] = []
    load = im.load

    def counted() -> object:
        loads.append(1)
        return load()

    im.load = counted  # type: ignore[method-assign]
    return loads


def test_a_png_without_exif_is_not_decoded_to_look_for_one() -> None:
    im = pre.open_image(_oriented("PNG", None), PreprocessConfig(max_pixels=10**8))
    loads = _count_loads(im)
    assert pre.decode_cost(im) == 300 * 200
    assert not loads  # PngImageFile.getexif loads the pixels when the header has no eXIf


def test_budget_is_released_when_a_decode_fails() -> None:
    budget = DecodeBudget(megapixels=1)
    with pytest.raises(ValueError), budget.hold(900_000):
        raise ValueError("corrupt")
    assert budget.in_use == 0
    with budget.hold(900_000):  # would wait forever had the failure kept its share
        pass


@pytest.mark.parametrize(("budget_mp", "most_images"), [(10.0, 2), (3.0, 1)])
def test_scoring_many_large_pngs_stays_within_the_budget(
    tiny_model, server, fetcher, monkeypatch, restore_limits, budget_mp, most_images
) -> None:
    """16 workers fetch 12 different 2000x2000 PNGs (4 MP each): never more decode at once than the
    budget allows (a budget smaller than one image decodes them one at a time), and all score."""
    set_decode_limits(DecodeLimits(max_pixels=pre.DEFAULT_MAX_PIXELS, budget_megapixels=budget_mp))
    urls = [server.image(f"/budget/{budget_mp}/{i}.png", banded_png(2000, 2000, seed=i)) for i in range(12)]
    in_flight = 0
    most = 0
    lock = threading.Lock()
    real = pre.load_rgb

    def counting(im: Image.Image) -> Image.Image:  # the real decode, counted
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        try:
            time.sleep(0.02)  # keep decodes long enough to overlap when nothing holds them back
            return real(im)
        finally:
            with lock:
                in_flight -= 1

    monkeypatch.setattr(pre, "load_rgb", counting)
    results = list(score_pairs([Record(u, "a red circle") for u in urls], tiny_model, fetcher, workers=16))
    assert all(r.ok for r in results), [r.error_text for r in results if not r.ok]
    assert most == most_images  # they overlapped as far as the budget let them, no further
    assert pre.decode_budget().peak <= pre.decode_budget().capacity


# ------------------------------------------------------------------ extreme aspect ratios, trained model
def test_crop_only_resize_drift_on_the_trained_tiny_model(tiny_model, tiny_clip_dir: Path) -> None:
    """Similarities of extreme-aspect pictures through our preprocessing and through
    CLIPImageProcessor (fp32 torch both): within 0.002 of each other."""
    from transformers import CLIPImageProcessorPil

    ref = CLIPImageProcessorPil.from_pretrained(str(tiny_clip_dir))
    cfg = tiny_model.preprocess
    rng = random.Random(7)
    ours, theirs = [], []
    for i, size in enumerate([(3000, 40), (40, 3000), (6000, 64), (64, 6000), (20000, 3), (2, 9000), (1500, 90)]):
        img = draw(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng).resize(size, Image.Resampling.BILINEAR)
        if i % 2:
            noise = np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            img = Image.blend(img, Image.fromarray(noise), 0.3)
        assert size[0] * size[1] < pre.DEFAULT_MAX_PIXELS
        ours.append(preprocess(img, cfg))
        theirs.append(ref(images=img, return_tensors="np")["pixel_values"][0])
    captions = all_captions()
    text = tiny_model.embed_texts(captions)[0]
    sim_ours = (tiny_model.embed_images(np.stack(ours)) @ text.T + 1) / 2
    sim_ref = (tiny_model.embed_images(np.stack(theirs).astype(np.float32)) @ text.T + 1) / 2
    drift = np.abs(sim_ours - sim_ref).max()
    print(f"tiny model, extreme aspect ratios: max |similarity drift| {drift:.6f}")
    assert drift < 0.002


def test_decoded_images_live_in_mapped_blocks() -> None:
    """Pillow's 16 MiB default blocks stay, freed, in the malloc arena of each decode thread (RSS
    grew to one decoded image per thread, 5.1 GB for 16 threads, though two decoded at once):
    blocks above glibc's largest mmap threshold (32 MiB) are unmapped when an image is freed."""
    import os

    core = Image.core  # type: ignore[attr-defined]
    if "PILLOW_BLOCK_SIZE" in os.environ:
        pytest.skip("PILLOW_BLOCK_SIZE is set: the operator chose")
    assert core.get_block_size() >= pre.PILLOW_BLOCK_BYTES > 32 * MIB
