"""The S3 adapter of the object-store port, over an in-process stand-in for boto3's S3 client whose
bodies are botocore's own ``StreamingBody`` (so a cut-off body raises exactly what botocore raises:
``ResponseStreamingError`` or ``IncompleteReadError``). The same adapter runs against moto behind
a fault-injecting proxy in tests/e2e/test_jobs.py."""

from __future__ import annotations

import hashlib
import io

import pytest
from botocore.exceptions import ClientError
from botocore.response import StreamingBody
from urllib3.exceptions import ProtocolError

from similarity.jobs import ObjectChanged, ObjectMissing, PreconditionFailed, S3ObjectStore
from similarity.jobs.objects import MIN_PART


def client_error(code: str, status: int = 400) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


class CutRaw(io.RawIOBase):
    """A socket stream that stops after ``cut`` bytes: drops (ProtocolError) or ends early."""

    def __init__(self, data: bytes, cut: int | None, how: str) -> None:
        self.data, self.cut, self.how, self.pos = data, cut, how, 0

    def read(self, amt: int | None = None) -> bytes:
        end = len(self.data) if amt is None else self.pos + amt
        if self.cut is not None and end > self.cut:
            if self.pos >= self.cut:
                if self.how == "drop":
                    raise ProtocolError("Connection broken: IncompleteRead")
                return b""
            end = self.cut
        chunk = self.data[self.pos : end]
        self.pos += len(chunk)
        return chunk


class FakeS3:
    """The calls S3ObjectStore makes, with S3's answers (versions, ranges, conditions)."""

    def __init__(self) -> None:
        self.versions: dict[str, list[tuple[str, bytes]]] = {}
        self.etags: dict[str, str] = {}  # multipart objects' ETags
        self.versioned = True
        self.cuts: list[tuple[int, str]] = []  # for the next GETs: (bytes before the cut, how)
        self.gets: list[dict] = []
        self.uploads: dict[str, list[bytes]] = {}
        self.aborted: list[str] = []
        self.complete_answer_lost = False
        self.fail_part: int | None = None

    def _etag(self, data: bytes) -> str:
        return hashlib.md5(data).hexdigest()

    def put(self, key: str, data: bytes) -> str:
        vid = f"v{sum(len(v) for v in self.versions.values()) + 1}"
        self.versions.setdefault(key, []).append((vid, data))
        return vid

    def _find(self, key: str, version: str | None) -> tuple[str, bytes]:
        for vid, data in reversed(self.versions.get(key, [])):
            if version in (None, vid):
                return vid, data
        raise client_error("NoSuchVersion" if version else "NoSuchKey", 404)

    def get_object(self, Bucket: str, Key: str, VersionId=None, Range=None, IfMatch=None) -> dict:
        self.gets.append({"Key": Key, "VersionId": VersionId, "Range": Range, "IfMatch": IfMatch})
        vid, data = self._find(Key, VersionId)
        if IfMatch and IfMatch.strip('"') != self._etag(data):
            raise client_error("PreconditionFailed", 412)
        full_etag = self._etag(data)
        if Range:
            data = data[int(Range.split("=")[1].rstrip("-")) :]
        cut, how = self.cuts.pop(0) if self.cuts else (None, "")
        body = StreamingBody(CutRaw(data, cut, how), len(data))
        resp = {"Body": body, "ContentLength": len(data), "ETag": f'"{full_etag}"'}
        return {**resp, "VersionId": vid} if self.versioned else resp

    def head_object(self, Bucket: str, Key: str, VersionId=None) -> dict:
        if Key.startswith("denied/"):  # no s3:ListBucket: AWS answers a bare 403 for a missing key
            raise client_error("403", 403)
        vid, data = self._find(Key, VersionId)
        etag = self.etags.get(vid) or self._etag(data)
        return {"ContentLength": len(data), "ETag": f'"{etag}"', "VersionId": vid}

    def put_object(self, Bucket: str, Key: str, Body: bytes, ContentType: str, IfNoneMatch=None, IfMatch=None):
        if IfNoneMatch == "*" and Key in self.versions:
            raise client_error("PreconditionFailed", 412)
        if IfNoneMatch == "*" and Key.startswith("racing/"):
            raise client_error("ConditionalRequestConflict", 409)
        if IfMatch is not None and (
            Key not in self.versions or self._etag(self._find(Key, None)[1]) != IfMatch.strip('"')
        ):
            raise client_error("PreconditionFailed", 412)
        self.put(Key, Body)
        return {"ETag": f'"{self._etag(Body)}"'}

    def create_multipart_upload(self, Bucket: str, Key: str, ContentType: str) -> dict:
        uid = f"up{len(self.uploads) + 1}"
        self.uploads[uid] = []
        return {"UploadId": uid}

    def upload_part(self, Bucket, Key, UploadId, PartNumber, Body) -> dict:
        if self.fail_part == PartNumber:
            raise client_error("InternalError", 500)
        assert PartNumber == len(self.uploads[UploadId]) + 1
        self.uploads[UploadId].append(Body)
        return {"ETag": f'"{self._etag(Body)}"'}

    def complete_multipart_upload(self, Bucket, Key, UploadId, MultipartUpload) -> dict:
        if UploadId not in self.uploads:
            raise client_error("NoSuchUpload", 404)
        parts = self.uploads.pop(UploadId)
        assert [p["PartNumber"] for p in MultipartUpload["Parts"]] == list(range(1, len(parts) + 1))
        assert all(len(p) >= MIN_PART for p in parts[:-1])
        vid = self.put(Key, b"".join(parts))
        digest = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
        self.etags[vid] = f"{digest}-{len(parts)}"
        if self.complete_answer_lost:  # done, but the answer never arrived: the retry finds no upload
            self.complete_answer_lost = False
            raise client_error("NoSuchUpload", 404)
        return {"ETag": f'"{digest}-{len(parts)}"'}

    def abort_multipart_upload(self, Bucket, Key, UploadId) -> None:
        self.uploads.pop(UploadId, None)
        self.aborted.append(UploadId)


@pytest.fixture
def s3() -> FakeS3:
    return FakeS3()


@pytest.fixture
def store(s3: FakeS3) -> S3ObjectStore:
    return S3ObjectStore(s3, part_size=MIN_PART, sleep=lambda _s: None)


DATA = bytes(range(256)) * 4000  # ~1 MB


@pytest.mark.parametrize("how", ["drop", "short"])
def test_cut_off_stream_resumes_at_the_cut_with_the_same_version(s3, store, how) -> None:
    vid = s3.put("incoming/x.csv", DATA)
    s3.put("incoming/x.csv", b"a newer upload")  # must never be spliced in
    s3.cuts = [(100_000, how), (500_000, how)]  # the first read and the first resume are cut
    with store.open("b", "incoming/x.csv", version_id=vid) as f:
        assert f.read() == DATA
    assert [g["Range"] for g in s3.gets] == [None, "bytes=100000-", "bytes=600000-"]
    assert all(g["VersionId"] == vid for g in s3.gets)


def test_stream_without_a_version_resumes_only_the_same_etag(s3, store) -> None:
    s3.versioned = False
    s3.put("k", DATA)
    s3.cuts = [(1000, "drop")]
    f = store.open("b", "k")
    assert f.read(500) == DATA[:500]
    s3.put("k", b"overwritten meanwhile")
    s3.versions["k"] = [s3.versions["k"][-1]]  # an unversioned bucket: the old bytes are gone
    with pytest.raises(ObjectChanged):
        f.read()
    assert s3.gets[-1]["IfMatch"].strip('"') == hashlib.md5(DATA).hexdigest()


def test_cut_offs_beyond_the_attempts_raise(s3, store) -> None:
    s3.put("k", DATA)
    s3.cuts = [(10, "drop")] * 10
    with pytest.raises(Exception, match="IncompleteRead|Connection broken|ended at byte"):
        store.open("b", "k").read()


def test_cut_offs_far_apart_never_use_up_the_attempts(s3) -> None:
    # Before: the attempts counted every cut-off of the stream, so a long read (the GPU task's
    # input over hours) failed on its fifth cut however far apart, each resume having held.
    store = S3ObjectStore(s3, part_size=MIN_PART, sleep=lambda _s: None, resume_progress=100_000)
    s3.put("k", DATA)
    s3.cuts = [(120_000, "drop")] * 8  # every GET is cut once it has sent 120 kB
    with store.open("b", "k") as f:
        assert f.read() == DATA
    assert len(s3.gets) == 9
    s3.cuts = [(120_000, "drop")] + [(50_000, "drop")] * 5  # then too little progress, five times
    with pytest.raises(Exception, match="IncompleteRead|Connection broken|ended at byte"):
        store.open("b", "k").read()


@pytest.mark.parametrize("how", ["drop", "short"])
def test_small_get_is_read_again_after_a_cut(s3, store, how) -> None:
    s3.put("jobs/j/done/part-00000.json", b'{"rows": 3}' * 100)
    s3.cuts = [(50, how), (60, how)]
    blob = store.get("b", "jobs/j/done/part-00000.json")
    assert blob is not None and blob.data == b'{"rows": 3}' * 100 and len(s3.gets) == 3


def test_missing_and_denied_are_told_apart(s3, store) -> None:
    assert store.get("b", "jobs/none.json") is None
    with pytest.raises(ObjectMissing):
        store.head("b", "incoming/none.csv")
    with pytest.raises(ObjectMissing):
        store.open("b", "incoming/none.csv")
    with pytest.raises(ClientError):  # 403 without ListBucket is an error, never "missing"
        store.head("b", "denied/x")


def test_conditional_writes(s3, store) -> None:
    etag = store.put_if_absent("b", "lock", b"1", "application/json")
    assert etag == hashlib.md5(b"1").hexdigest()
    assert store.put_if_absent("b", "lock", b"2", "application/json") is None
    assert store.put_if_absent("b", "racing/lock", b"2", "application/json") is None  # 409: lost too
    new = store.put("b", "lock", b"3", "application/json", if_match=etag)
    with pytest.raises(PreconditionFailed):
        store.put("b", "lock", b"4", "application/json", if_match=etag)
    assert store.put("b", "lock", b"5", "application/json", if_match=new)


def test_writer_streams_parts_of_bounded_size(s3, store) -> None:
    payload = (b"0123456789abcdef" * 65536) * 11  # 11 MiB: two full parts and a last one
    with store.writer("b", "scored/x.csv", "text/csv") as w:
        for i in range(0, len(payload), 300_000):
            w.write(payload[i : i + 300_000])
            assert len(w.buf) < MIN_PART  # never more than one part held
    assert s3._find("scored/x.csv", None)[1] == payload and not s3.uploads and not s3.aborted


def test_small_output_is_one_put(s3, store) -> None:
    with store.writer("b", "scored/x.csv", "text/csv") as w:
        w.write(b"url,caption\n")
    assert s3._find("scored/x.csv", None)[1] == b"url,caption\n" and not s3.uploads


def test_writer_aborts_on_error_and_writes_nothing(s3, store) -> None:
    with pytest.raises(RuntimeError), store.writer("b", "scored/x.csv", "text/csv") as w:
        w.write(b"x" * (MIN_PART * 2))
        raise RuntimeError("a part could not be read")
    assert s3.aborted == ["up1"] and "scored/x.csv" not in s3.versions


def test_writer_aborts_when_a_part_upload_fails(s3, store) -> None:
    s3.fail_part = 2
    with pytest.raises(ClientError), store.writer("b", "scored/x.csv", "text/csv") as w:
        w.write(b"x" * (MIN_PART * 3))
    assert s3.aborted == ["up1"] and "scored/x.csv" not in s3.versions


def test_lost_complete_answer_is_recognised_by_the_etag(s3, store) -> None:
    s3.complete_answer_lost = True
    with store.writer("b", "scored/x.csv", "text/csv") as w:
        w.write(b"y" * (MIN_PART + 10))
    assert s3._find("scored/x.csv", None)[1] == b"y" * (MIN_PART + 10) and not s3.aborted


def test_part_size_below_s3_minimum_is_refused(s3) -> None:
    with pytest.raises(ValueError, match="minimum"):
        S3ObjectStore(s3, part_size=1024)
