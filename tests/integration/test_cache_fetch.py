"""Conditional fetches against real loopback servers: a static-host-like image server and moto's S3."""

from __future__ import annotations

import pytest

from similarity.errors import HttpStatusError
from similarity.fetch import Validators
from support.conditional import ConditionalImages


@pytest.fixture
def images(server):
    return ConditionalImages(server)


def test_http_validators_come_back_and_a_match_is_a_304_without_a_body(fetcher, images) -> None:
    url = images.put("/cond/a.png", b"first bytes")
    got = fetcher.fetch_conditional(url)
    assert got.data == b"first bytes" and got.etag and got.last_modified and not got.not_modified
    again = fetcher.fetch_conditional(url, Validators(got.etag, got.last_modified))
    assert again.not_modified and again.data is None and again.etag == got.etag
    only_date = fetcher.fetch_conditional(url, Validators(None, got.last_modified))
    assert only_date.not_modified
    assert [(s.if_none_match, s.status) for s in images.log] == [(None, 200), (got.etag, 304), (None, 304)]
    assert images.log[2].if_modified_since == got.last_modified


def test_changed_bytes_answer_200_with_new_validators(fetcher, images) -> None:
    url = images.put("/cond/b.png", b"v1")
    first = fetcher.fetch_conditional(url)
    images.put("/cond/b.png", b"v2")
    second = fetcher.fetch_conditional(url, Validators(first.etag, first.last_modified))
    assert second.data == b"v2" and second.etag != first.etag and second.last_modified != first.last_modified
    assert images.statuses() == [200, 200]


def test_validators_follow_redirects_to_where_the_image_is(fetcher, images, server) -> None:
    url = images.put("/cond/c.png", b"bytes")
    start = server.redirect("/cond/moved", url)
    first = fetcher.fetch_conditional(start)
    again = fetcher.fetch_conditional(start, Validators(first.etag))
    assert first.data == b"bytes" and again.not_modified


def test_a_304_nobody_asked_for_is_still_an_error(fetcher, server) -> None:
    url = server.status("/cond/unasked", 304)
    with pytest.raises(HttpStatusError) as exc:
        fetcher.fetch(url)
    assert exc.value.code == "http_304"
    with pytest.raises(HttpStatusError):
        fetcher.fetch_conditional(url)


def test_other_sources_have_no_validators(fetcher) -> None:
    got = fetcher.fetch_conditional("data:image/png;base64,aGVsbG8=", Validators('"x"'))
    assert got.data == b"hello" and got.etag is None


def test_s3_if_none_match_on_get(s3, bucket, fast_settings) -> None:
    from similarity.fetch import Fetcher

    s3.put_object(Bucket=bucket, Key="img/a.png", Body=b"one")
    f = Fetcher(fast_settings, s3_client=s3)
    url = f"s3://{bucket}/img/a.png"
    first = f.fetch_conditional(url)
    assert first.data == b"one" and first.etag
    assert f.fetch_conditional(url, Validators(first.etag)).not_modified
    s3.put_object(Bucket=bucket, Key="img/a.png", Body=b"two")
    changed = f.fetch_conditional(url, Validators(first.etag))
    assert changed.data == b"two" and changed.etag != first.etag
    assert f.fetch(url) == b"two"
