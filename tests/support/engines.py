"""What the engine tests and bench/engines.py share: the hostile CSV every engine scores beside the
CLI, the CLI's reference run, and a check of every socket the engine's processes hold.

Engines are only ever started through ``similarity.engines.local`` (``local_spark`` /
``local_ray``), which holds every loopback protection; this module adds nothing that starts one.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from similarity.cli import main as cli_main

from .imageserver import ImageServer, huge_png_header, png_bytes
from .shapes import COLOURS, SHAPES, draw

#: Every row's settings, for the CLI and the engines alike (short deadline: the drip row times out).
DEADLINE = 2.0
MAX_BYTES = 2 * 1024 * 1024
ENGINE_SETTINGS = {
    "backend": "torch",
    "allowed_networks": "127.0.0.1/32",
    "deadline": DEADLINE,
    "max_image_bytes": MAX_BYTES,
}
CLI_FLAGS = [
    "--max-image-bytes",
    str(MAX_BYTES),
    "--backend",
    "torch",
    "--allow-network",
    "127.0.0.1/32",
    "--timeout",
    str(DEADLINE),
    "--no-local-paths",
    "--no-progress",
]
HEADER = ["id", "url", "caption", "note"]


@dataclass(frozen=True)
class Hostile:
    """The CSV's rows and which ids hold the poison images."""

    rows: list[list[str]]
    poison_ids: frozenset[str]
    expected_codes: frozenset[str]


def _jpeg(img: object) -> bytes:
    return png_bytes(img, "JPEG", quality=90)  # type: ignore[arg-type]


def hostile_rows(server: ImageServer, forbidden: ImageServer, s3_bucket: str | None = None, repeat: int = 3) -> Hostile:
    """Good pictures (repeated: de-duplication), every fault mode of the image server, guard
    refusals, CSV-hostile captions and poison images (decompression bomb, truncated JPEG, gzip
    bomb), interleaved so every partition of any split holds some of each."""
    rng = random.Random(21)
    good: list[tuple[str, str]] = []
    for i, (colour, shape) in enumerate((c, s) for c in list(COLOURS)[:3] for s in SHAPES[:2]):
        img = draw(colour, shape, rng)
        url = server.image(f"/eng/{i}.png", png_bytes(img))
        good.append((url, f"a {colour} {shape}"))
        good.append((url, f"a {list(COLOURS)[(i + 1) % 4]} {shape}"))  # a wrong colour for the same picture
    jpeg = _jpeg(draw("blue", "triangle", rng))
    good.append((server.image("/eng/blue.jpg", jpeg, "image/jpeg"), "a blue triangle"))
    good.append((server.fail_then_serve("/eng/flaky.png", png_bytes(draw("red", "square", rng)), 500), "a red square"))
    good.append(("data:image/png;base64," + _b64(png_bytes(draw("green", "circle", rng))), "a green circle"))
    good.append((good[0][0], "a " * 60 + "red circle"))  # over 77 tokens: truncated
    good.append((good[1][0], 'a caption, with "quotes",\na newline and ünïcödé'))
    poison = [
        (server.image("/eng/bomb.png", huge_png_header(100_000, 100_000)), "a decompression bomb"),
        (server.image("/eng/cut.jpg", jpeg[: len(jpeg) // 2], "image/jpeg"), "a truncated jpeg"),
        (server.huge("/eng/bomb.gz", 50 * 1024 * 1024, gzipped=True), "a gzip bomb"),
    ]
    bad = [
        (server.status("/eng/missing.png", 404), "a missing picture"),
        (server.drip("/eng/slow.png", b"\x89PNG" + b"\0" * 64, interval=0.5), "a slow picture"),
        (server.huge("/eng/big.png", 3 * 1024 * 1024, declare=False), "too many bytes"),
        (server.redirect("/eng/loop", "/eng/loop"), "a redirect loop"),
        (server.redirect("/eng/to-internal", forbidden.url("/eng/secret.png")), "a redirect inside"),
        (forbidden.image("/eng/secret.png", b"secret"), "an internal host"),
        (server.image("/eng/text.png", b"<html>not a picture</html>", "image/png"), "not a picture"),
        ("http://127.0.0.1:1/refused.png", "a refused connection"),
        ("data:image/png,not-base64", "a data uri without base64"),
        ("ftp://example.invalid/x.png", "an ftp url"),
        ("/etc/hostname", "a local path"),
        ("", "no url"),
        (good[0][0], ""),
        (good[0][0], "x" * (130 * 1024)),  # over the CLI's field limit
    ]
    if s3_bucket:
        bad.append((f"s3://{s3_bucket}/eng/none.png", "a missing object"))
    rows: list[list[str]] = []
    poison_ids: set[str] = set()
    ordered = [(u, c, "good") for u, c in good] * repeat + [(u, c, "bad") for u, c in bad]
    ordered += [(u, c, "poison") for u, c in poison]
    rng.shuffle(ordered)
    for i, (url, caption, note) in enumerate(ordered):
        rows.append([str(i), url, caption, note])
        if note == "poison":
            poison_ids.add(str(i))
    codes = {
        "http_404",
        "timeout",
        "too_large",
        "too_many_redirects",
        "blocked_address",
        "not_an_image",
        "connection_error",
        "invalid_data_uri",
        "unsupported_source",
        "local_path_disabled",
        "missing_url",
        "missing_caption",
        "field_too_large",
        "too_many_pixels",
        "decode_error",
    }
    if s3_bucket:
        codes.add("not_found")
    return Hostile(rows, frozenset(poison_ids), frozenset(codes))


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def write_csv(path: Path, rows: Iterable[list[str]], header: list[str] = HEADER) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@dataclass(frozen=True)
class Scored:
    similarity: float | None
    cosine: float | None
    error: str
    truncated: bool

    @property
    def code(self) -> str:
        return self.error.split(":", 1)[0] if self.error else ""


_CLI_RUNS: dict[tuple[str, str], dict[str, Scored]] = {}


def cli_scores(csv_path: Path, model_dir: Path, out: Path) -> dict[str, Scored]:
    """The CLI's output for ``csv_path``, by id (run once per session for the same bytes and model)."""
    import hashlib

    key = (hashlib.sha256(csv_path.read_bytes()).hexdigest(), str(model_dir))
    if key not in _CLI_RUNS:
        _CLI_RUNS[key] = _run_cli(csv_path, model_dir, out)
    return _CLI_RUNS[key]


def _run_cli(csv_path: Path, model_dir: Path, out: Path) -> dict[str, Scored]:
    assert cli_main(["score", str(csv_path), "-o", str(out), "--model", str(model_dir), *CLI_FLAGS]) == 0
    with out.open(newline="", encoding="utf-8") as fh:
        return {
            r["id"]: Scored(
                float(r["similarity"]) if r["similarity"] else None,
                float(r["cosine"]) if r["cosine"] else None,
                r["error"],
                r["truncated"] == "true",
            )
            for r in csv.DictReader(fh)
        }


def frame_scores(frame) -> dict[str, Scored]:  # type: ignore[no-untyped-def]
    """An engine's output (a pandas DataFrame, any dtypes) by id, nulls as the CLI's empties."""
    import pandas as pd

    out = {}
    for rec in frame.to_dict("records"):
        sim, cos, err = rec["similarity"], rec["cosine"], rec["error"]
        out[str(rec["id"])] = Scored(
            None if pd.isna(sim) else float(sim),
            None if pd.isna(cos) else float(cos),
            "" if err is None or pd.isna(err) else str(err),
            bool(rec["truncated"]),
        )
    return out


def assert_same_scores(engine: dict[str, Scored], cli: dict[str, Scored], tol: float = 1e-4) -> None:
    assert sorted(engine) == sorted(cli), "rows lost or added"
    for key, want in cli.items():
        got = engine[key]
        assert got.code == want.code, (key, got, want)
        assert got.truncated == want.truncated, (key, got, want)
        for a, b in ((got.similarity, want.similarity), (got.cosine, want.cosine)):
            assert (a is None) == (b is None), (key, got, want)
            if a is not None and b is not None:
                assert abs(a - b) <= tol, (key, got, want)


def load_records(log_dir: Path) -> list[dict]:
    import json

    return [json.loads(p.read_text()) for p in sorted(log_dir.glob("load-*.json"))]


# ------------------------------------------------------------------------------------- sockets
@dataclass(frozen=True)
class Socket:
    pid: int
    proto: str
    local: tuple[str, int]
    remote: tuple[str, int]
    state: str

    @property
    def listening(self) -> bool:
        return (self.proto.startswith("tcp") and self.state == "0A") or (
            self.proto.startswith("udp") and self.remote[1] == 0
        )


def decode_address(hexaddr: str) -> tuple[str, int]:
    """``/proc/net/tcp{,6}`` notation (host byte order words) to (ip, port)."""
    host, port = hexaddr.split(":")
    raw = bytes.fromhex(host)
    # Each 32-bit word is stored little-endian.
    packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(packed)), int(port, 16)


def parse_proc_net(text: str, proto: str, inodes: dict[int, int]) -> list[Socket]:
    out = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 10:
            continue
        inode = int(parts[9])
        if inode in inodes:
            out.append(Socket(inodes[inode], proto, decode_address(parts[1]), decode_address(parts[2]), parts[3]))
    return out


def socket_inodes(pids: Iterable[int]) -> dict[int, int]:
    inodes: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes[int(link[8:-1])] = pid
    return inodes


def sockets_of(pids: Iterable[int]) -> list[Socket]:
    inodes = socket_inodes(pids)
    out: list[Socket] = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            text = Path(f"/proc/net/{proto}").read_text()
        except OSError:
            continue
        out += parse_proc_net(text, proto, inodes)
    return out


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def off_loopback(sockets: Iterable[Socket]) -> list[Socket]:
    """Sockets bound to a non-loopback or wildcard address, or connected to a non-loopback peer."""
    bad = []
    for s in sockets:
        if not is_loopback(s.local[0]) or not s.listening and s.remote[1] != 0 and not is_loopback(s.remote[0]):
            bad.append(s)
    return bad


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, []))
    return out


def pids_mentioning(text: str) -> set[int]:
    """Processes whose command line contains ``text`` (Ray's session directory), and their children."""
    roots = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if text.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                    roots.add(int(d))
            except OSError:
                continue
    out: set[int] = set()
    for r in roots:
        out |= descendants(r)
    return out


def csv_text(rows: list[list[str]], header: list[str] = HEADER) -> str:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()
