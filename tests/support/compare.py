"""Two answers to the same request compared: equal, except scores may differ by one unit of their
4th decimal (the rows were embedded in other batches, and float sums differ in the last bits)."""

from __future__ import annotations


def same(a: object, b: object, where: str = "body") -> None:
    if isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= 1.0001e-4, f"{where}: {a} != {b}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
