"""``split_s3``: an S3 URI's bucket and key, where "?" and "#" are characters of the key."""

from __future__ import annotations

import pytest

from similarity.errors import InputNotFound
from similarity.io.streams import split_s3


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/in.csv", ("bucket", "in.csv")),
        ("s3://bucket/dir/a?b#c.csv", ("bucket", "dir/a?b#c.csv")),  # urlsplit read a query and a fragment
        ("s3://bucket/?\u00a3\u0080", ("bucket", "?\u00a3\u0080")),
        ("S3://bucket//k", ("bucket", "k")),
    ],
)
def test_bucket_and_key(uri: str, expected: tuple[str, str]) -> None:
    assert split_s3(uri) == expected


@pytest.mark.parametrize("uri", ["s3://bucket/", "s3://bucket//", "s3:///key", "s3://bucket", "https://b/k"])
def test_no_bucket_or_no_key_is_refused(uri: str) -> None:
    with pytest.raises(InputNotFound, match="is not s3://bucket/key"):
        split_s3(uri)
