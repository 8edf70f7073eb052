"""One behaviour suite for both stores (a local folder and S3 on a real moto server).

Failure modes S3 can produce but moto cannot (5xx, throttling, rejected credentials,
corrupt reads) come from a tiny loopback server that replays canned S3 answers.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from minio import Minio

from shared.errors import ArtifactNotFound, JsonLinesError, LayoutError, StoreError
from shared.store import (
    DEFAULT_PARALLEL_UPLOADS,
    DEFAULT_PART_SIZE,
    DEFAULT_STORE_URL,
    LocalStore,
    S3Store,
    Store,
    open_store,
)
from tests.fixtures_s3 import TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.support import ROOT, free_port

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return open_store(tmp_path / "store")
    return open_store(request.getfixturevalue("s3_store_url"))


# -- round trips -------------------------------------------------------------------------


def test_bytes_text_json_round_trip(store: Store) -> None:
    store.put_bytes("runs/r/blob.bin", b"\x00\xffdata")
    store.put_text("runs/r/note.txt", "naïve ✓\n")
    store.put_json("runs/r/status/train.json", {"b": [1, 2.5, None], "a": "é"})
    assert store.get_bytes("runs/r/blob.bin") == b"\x00\xffdata"
    assert store.get_text("runs/r/note.txt") == "naïve ✓\n"
    assert store.get_json("runs/r/status/train.json") == {"a": "é", "b": [1, 2.5, None]}
    # Sorted keys and UTF-8, so artifacts diff cleanly.
    assert store.get_text("runs/r/status/train.json").index('"a"') < 10
    store.put_bytes("runs/r/blob.bin", b"")
    assert store.get_bytes("runs/r/blob.bin") == b""


def test_jsonl_round_trip(store: Store) -> None:
    rows = [{"step": 2, "loss": float("inf"), "note": "é\u2028x"}, [1, None], {}]
    store.put_jsonl("runs/r/train/metrics.jsonl", rows)
    # Sorted keys, ASCII only, one row per line, so any line splitter reads it back.
    text = store.get_text("runs/r/train/metrics.jsonl")
    assert text == ('{"loss": Infinity, "note": "\\u00e9\\u2028x", "step": 2}\n[1, null]\n{}\n')
    assert store.get_jsonl("runs/r/train/metrics.jsonl") == rows
    store.put_jsonl("runs/r/empty.jsonl", [])
    assert store.get_text("runs/r/empty.jsonl") == ""
    assert store.get_jsonl("runs/r/empty.jsonl") == []
    with pytest.raises(ValueError, match="Out of range float"):
        store.put_jsonl("runs/r/strict.jsonl", [{"score": float("nan")}], allow_nan=False)
    assert not store.exists("runs/r/strict.jsonl")


def test_jsonl_lines_count_blank_lines_and_missing_keys(store: Store) -> None:
    store.put_text("d/scores.jsonl", '{"a": 1}\n\n  \r\n{"a": 2}\r\n')
    assert store.get_jsonl_lines("d/scores.jsonl") == [(1, {"a": 1}), (4, {"a": 2})]
    with pytest.raises(ArtifactNotFound, match="does not exist"):
        store.get_jsonl("d/missing.jsonl")
    assert store.get_jsonl("d/missing.jsonl", missing_ok=True) == []
    assert store.get_jsonl_lines("d/missing.jsonl", missing_ok=True) == []


def test_jsonl_bad_line_names_url_and_line(store: Store) -> None:
    store.put_text("d/bad.jsonl", '{"a": 1}\n\n{oops\n')
    with pytest.raises(JsonLinesError) as err:
        store.get_jsonl("d/bad.jsonl")
    assert err.value.line_number == 3
    assert err.value.reason.startswith("Expecting property name")
    assert str(err.value) == (
        f"{store.url_of('d/bad.jsonl')} line 3 is not valid JSON: {err.value.reason}"
    )
    assert isinstance(err.value, StoreError)


def test_tensors_round_trip(store: Store) -> None:
    tied = torch.randn(8, 4)
    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "i64": torch.arange(-5, 5, dtype=torch.int64),
        "transposed": torch.randn(4, 6).t(),
        "wte": tied,
        "lm_head": tied,
    }
    store.put_tensors("t/model.safetensors", tensors, {"step": "12", "note": "x"})
    loaded, metadata = store.get_tensors("t/model.safetensors")
    assert metadata == {"step": "12", "note": "x"}
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name
    store.put_tensors("t/plain.safetensors", {"x": torch.zeros(2)})
    assert store.get_tensors("t/plain.safetensors")[1] == {}


def test_get_tensors_rejects_non_safetensors(store: Store) -> None:
    store.put_bytes("t/bad.safetensors", b"not a safetensors file at all")
    with pytest.raises(StoreError, match="is not a valid safetensors file") as err:
        store.get_tensors("t/bad.safetensors")
    assert store.url_of("t/bad.safetensors") in str(err.value)


def test_exists_and_delete(store: Store) -> None:
    assert not store.exists("x/y/z.json")
    store.put_json("x/y/z.json", {})
    assert store.exists("x/y/z.json")
    assert not store.exists("x/y")  # a "folder" is not an object
    store.delete("x/y/z.json")
    store.delete("x/y/z.json")  # missing is fine
    assert not store.exists("x/y/z.json")
    # No empty folders stay behind locally, so listings agree with S3.
    assert store.list() == [] and store.list_dirs("") == []


def test_list_is_sorted_string_prefix(store: Store) -> None:
    keys = ["a/b/1", "a/b/sub/2", "a/bc/3", "a/bd", "z", "a/b/0"]
    for key in keys:
        store.put_bytes(key, key.encode())
    assert store.list() == sorted(keys)
    # A prefix is a plain string prefix, as in S3: "a/b" also matches "a/bc/3" and "a/bd";
    # "a/b/" means "inside folder a/b".
    assert store.list("a/b") == ["a/b/0", "a/b/1", "a/b/sub/2", "a/bc/3", "a/bd"]
    assert store.list("a/b/") == ["a/b/0", "a/b/1", "a/b/sub/2"]
    assert store.list("a/bc/") == ["a/bc/3"]
    assert store.list("a/b/s") == ["a/b/sub/2"]
    assert store.list("nope/") == []


def test_list_dirs(store: Store) -> None:
    for key in ["runs/run-b/spec.yaml", "runs/run-a/status/train.json", "runs/file", "top"]:
        store.put_bytes(key, b"x")
    assert store.list_dirs("") == ["runs"]
    assert store.list_dirs("runs/") == ["run-a", "run-b"]
    assert store.list_dirs("runs/run-a/") == ["status"]
    assert store.list_dirs("runs/run-b/") == []
    assert store.list_dirs("missing/") == []
    with pytest.raises(LayoutError, match="must be empty or end with '/'"):
        store.list_dirs("runs")


# -- streaming and atomicity -------------------------------------------------------------

_STREAM_CHILD = """
import sys, tracemalloc
from shared.store import open_store
store = open_store(sys.argv[1])
tracemalloc.start()
store.put_file("big/blob.bin", sys.argv[2])
store.get_file("big/blob.bin", sys.argv[3])
sys.stdout.write(str(tracemalloc.get_traced_memory()[1]))
"""


def test_large_file_streams_with_bounded_memory(store: Store, tmp_path: Path) -> None:
    """50 MB through put_file/get_file, measured in a child so the in-process moto server's
    own buffers do not count."""
    src, dst = tmp_path / "src.bin", tmp_path / "out" / "dst.bin"
    digest = hashlib.sha256()
    with src.open("wb") as f:
        for _ in range(50):
            chunk = os.urandom(MiB)
            digest.update(chunk)
            f.write(chunk)
    child = subprocess.run(
        [sys.executable, "-c", _STREAM_CHILD, store.url, str(src), str(dst)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    with dst.open("rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == digest.hexdigest()
    # An S3 upload holds a few parts at once (32 MiB by default); local copies 1 MiB at a time.
    s3_limit = (DEFAULT_PARALLEL_UPLOADS + 2) * DEFAULT_PART_SIZE + 4 * MiB
    assert s3_limit < 40 * MiB
    assert int(child.stdout) < (s3_limit if isinstance(store, S3Store) else 4 * MiB)
    assert [p.name for p in dst.parent.iterdir()] == ["dst.bin"]  # no temp file left


def test_readers_never_see_partial_writes(store: Store) -> None:
    old, new = os.urandom(1 * MiB), os.urandom(3 * MiB)
    store.put_bytes("race/blob", old)
    stop = threading.Event()
    writes = 0
    errors: list[BaseException] = []

    def writer() -> None:
        nonlocal writes
        try:
            while not stop.is_set():
                store.put_bytes("race/blob", new if writes % 2 == 0 else old)
                writes += 1
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deadline = time.monotonic() + 2.0
        reads = 0
        while time.monotonic() < deadline or writes < 4:
            data = store.get_bytes("race/blob")
            assert data in (old, new), f"read {len(data)} bytes, a mix"
            assert store.list("race/") == ["race/blob"]
            reads += 1
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert reads >= 10 and writes >= 4


# -- keys --------------------------------------------------------------------------------

BAD_KEYS = [
    "",
    "/abs/key",
    "a\\b",
    "a/../b",
    "..",
    "./a",
    "a/./b",
    "a//b",
    "a/",
    "a\x00b",
    "line\nbreak",
    "a/.b.tmp-0123456789abcdef",
    "runs/" + "x" * 256,  # a segment over the file-name limit
    "runs/" + "/".join(["x" * 200] * 6),  # a key over S3's 1024 bytes
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_rejected_by_name(store: Store, key: str) -> None:
    operations: list[Callable[[], object]] = [
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
    ]
    for operation in operations:
        with pytest.raises(LayoutError) as err:
            operation()
        assert repr(key) in str(err.value)
    assert store.list() == []


@pytest.mark.parametrize("prefix", ["/a/", "a/../", "a//", "a\\b/"])
def test_bad_prefixes_are_rejected(store: Store, prefix: str) -> None:
    with pytest.raises(LayoutError, match="prefix"):
        store.list(prefix)
    with pytest.raises(LayoutError, match="prefix"):
        store.list_dirs(prefix)


def test_size_and_sha256(store: Store) -> None:
    """What a DONE marker records and a cached rerun checks, alike on both backends."""
    data = b"driftlab" * 1000
    store.put_bytes("a/b.bin", data)
    assert store.size("a/b.bin") == len(data)
    assert store.sha256("a/b.bin") == hashlib.sha256(data).hexdigest()
    store.put_bytes("a/empty", b"")
    assert store.size("a/empty") == 0


def test_missing_key_names_the_url(store: Store, tmp_path: Path) -> None:
    key = "runs/r/extract/step-0/layer-00.safetensors"
    url = store.url_of(key)
    readers: list[Callable[[], object]] = [
        lambda: store.get_bytes(key),
        lambda: store.get_json(key),
        lambda: store.get_file(key, tmp_path / "dl" / "x.bin"),
        lambda: store.get_tensors(key),
        lambda: store.size(key),
        lambda: store.sha256(key),
    ]
    for read in readers:
        with pytest.raises(ArtifactNotFound) as err:
            read()
        message = str(err.value)
        assert url in message and "has the stage that writes it run?" in message
    assert not (tmp_path / "dl" / "x.bin").exists()


def test_put_file_of_a_missing_file(store: Store, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is not a file"):
        store.put_file("k", tmp_path / "nope.bin")


# -- local store specifics ---------------------------------------------------------------


def test_failed_local_write_keeps_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(tmp_path)
    store.put_bytes("a/k", b"old")

    def fail(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(StoreError, match="No space left on device") as err:
        store.put_bytes("a/k", b"new")
    assert store.url_of("a/k") in str(err.value)
    monkeypatch.undo()
    assert store.get_bytes("a/k") == b"old"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["k"]


def test_local_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    by_path = open_store(tmp_path / "s")
    by_url = open_store(f"file://{tmp_path}/s")
    assert isinstance(by_url, LocalStore)
    assert by_path.url == by_url.url == (tmp_path / "s").as_uri()
    by_path.put_text("k.txt", "v")
    assert by_url.get_text("k.txt") == "v"
    assert open_store(by_path.url).url == by_path.url
    monkeypatch.chdir(tmp_path)
    assert open_store(DEFAULT_STORE_URL).url == (tmp_path / "driftlab-data").as_uri()
    assert not (tmp_path / "driftlab-data").exists()  # created on first write only


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("gs://bucket/prefix", "unsupported scheme 'gs'"),
        ("http://example.com/x", "unsupported scheme 'http'"),
        ("file://otherhost/abs", "absolute local path"),
        ("  ", "store URL is empty"),
        ("s3://Bad_Bucket/x", "invalid S3 bucket name"),
        ("s3://bucket/a/../b", "'..'"),
    ],
)
def test_bad_store_urls(url: str, words: str) -> None:
    with pytest.raises(StoreError if "'..'" not in words else LayoutError) as err:
        open_store(url)
    assert words in str(err.value)
    if "scheme" in words:
        assert "file:///abs/path" in str(err.value) and "s3://bucket/prefix" in str(err.value)


# -- S3 specifics ------------------------------------------------------------------------


def test_bucket_created_on_first_write_only(s3_store_url: str, s3_endpoint: str) -> None:
    store = open_store(s3_store_url)
    assert isinstance(store, S3Store)
    client = Minio(
        s3_endpoint.removeprefix("http://"),
        access_key=TEST_ACCESS_KEY,
        secret_key=TEST_SECRET_KEY,
        secure=False,
    )
    assert store.list() == [] and store.list_dirs("") == [] and not store.exists("k")
    with pytest.raises(ArtifactNotFound):
        store.get_bytes("k")
    assert not client.bucket_exists(store.bucket)  # readers never create buckets
    store.put_bytes("k", b"v")
    assert client.bucket_exists(store.bucket)
    assert client.get_object(store.bucket, "store/k").data == b"v"  # under the prefix


def test_s3_repr_and_errors_hide_secrets(
    s3_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_store(s3_store_url)
    assert isinstance(store, S3Store)
    assert repr(store) == f"S3Store(url={s3_store_url!r}, endpoint={store.endpoint!r})"
    for secret in (TEST_ACCESS_KEY, TEST_SECRET_KEY):
        assert secret not in repr(store) and secret not in str(store)
    for endpoint in (
        f"http://{TEST_ACCESS_KEY}:{TEST_SECRET_KEY}@h:1",
        f"{TEST_ACCESS_KEY}:{TEST_SECRET_KEY}@h:9000",  # no scheme: no user to urlsplit
    ):
        monkeypatch.setenv("DRIFTLAB_S3_ENDPOINT", endpoint)
        with pytest.raises(StoreError) as err:
            open_store(s3_store_url)
        assert "must not contain credentials" in str(err.value)
        assert TEST_SECRET_KEY not in str(err.value) and TEST_ACCESS_KEY not in str(err.value)


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("DRIFTLAB_S3_ENDPOINT", "minio:9000", "must look like http://host:port"),
        ("DRIFTLAB_S3_ENDPOINT", "http://minio:9000/bucket", "without a path"),
        ("DRIFTLAB_S3_RETRY_SECONDS", "soon", "must be a number of seconds"),
    ],
)
def test_bad_s3_settings(
    s3_store_url: str, monkeypatch: pytest.MonkeyPatch, name: str, value: str, words: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(StoreError, match=words) as err:
        open_store(s3_store_url)
    assert name in str(err.value)


@pytest.mark.parametrize("operation", ["get_bytes", "put_bytes", "list"])
def test_unreachable_endpoint_fails_within_the_retry_bound(
    s3_store_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    operation: str,
) -> None:
    port = free_port()
    monkeypatch.setenv("DRIFTLAB_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("DRIFTLAB_S3_RETRY_SECONDS", "1.5")
    store = open_store(s3_store_url)
    calls: dict[str, Callable[[], object]] = {
        "get_bytes": lambda: store.get_bytes("k"),
        "put_bytes": lambda: store.put_bytes("k", b"v"),
        "list": lambda: store.list(),
    }
    start = time.monotonic()
    with pytest.raises(StoreError) as err:
        calls[operation]()
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert elapsed < 1.5 + 1.0
    assert message.startswith(f"cannot reach S3 endpoint http://127.0.0.1:{port} after ")
    assert "Connection refused" in message and "check DRIFTLAB_S3_ENDPOINT" in message
    assert int(message.split(" after ")[1].split()[0]) >= 2  # it did retry
    assert TEST_SECRET_KEY not in message and "\n" not in message
    assert "retrying" in caplog.text and TEST_SECRET_KEY not in caplog.text


# -- canned S3 answers -------------------------------------------------------------------

Answer = tuple[int, dict[str, str], bytes]


def _s3_error(status: int, code: str) -> Answer:
    body = f"<Error><Code>{code}</Code><Message>canned {code}</Message></Error>".encode()
    return status, {"Content-Type": "application/xml"}, body


def _s3_object(body: bytes, etag: str | None = None) -> Answer:
    etag = etag or hashlib.md5(body).hexdigest()
    return 200, {"Content-Type": "application/octet-stream", "ETag": f'"{etag}"'}, body


class _CannedS3:
    """Answers request i with answers[i] (the last one repeats), recording each request."""

    def __init__(self, answers: list[Answer]) -> None:
        self.answers = answers
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append(f"{self.command} {self.path}")
                status, headers, body = outer.answers[min(len(outer.requests), len(answers)) - 1]
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def canned_s3(
    s3_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[list[Answer]], tuple[_CannedS3, Store]]]:
    servers: list[_CannedS3] = []

    def start(answers: list[Answer]) -> tuple[_CannedS3, Store]:
        server = _CannedS3(answers)
        servers.append(server)
        monkeypatch.setenv("DRIFTLAB_S3_ENDPOINT", server.url)
        monkeypatch.setenv("DRIFTLAB_S3_RETRY_SECONDS", "1.5")
        return server, open_store(s3_store_url)

    yield start
    for server in servers:
        server.close()


def test_transient_failures_are_retried(canned_s3) -> None:
    server, store = canned_s3(
        [_s3_error(503, "SlowDown"), _s3_error(500, "InternalError"), _s3_object(b"hello")]
    )
    assert store.get_bytes("k") == b"hello"
    assert len(server.requests) == 3


def test_rejected_credentials_are_not_retried(canned_s3) -> None:
    server, store = canned_s3([_s3_error(503, "SlowDown"), _s3_error(403, "InvalidAccessKeyId")])
    with pytest.raises(StoreError) as err:
        store.get_bytes("k")
    message = str(err.value)
    assert "rejected the credentials for s3://" in message
    assert "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in message
    assert TEST_SECRET_KEY not in message and TEST_ACCESS_KEY not in message
    assert len(server.requests) == 2  # one retry for SlowDown, none for the rejection


def test_writes_with_rejected_credentials(canned_s3) -> None:
    server, store = canned_s3([(403, {}, b"")])  # HEAD bucket: 403 without a body
    with pytest.raises(StoreError, match="rejected the credentials") as err:
        store.put_bytes("k", b"v")
    assert TEST_SECRET_KEY not in str(err.value)
    assert len(server.requests) == 1


def test_corrupt_reads_are_retried_then_reported(canned_s3, tmp_path: Path) -> None:
    server, store = canned_s3([_s3_object(b"payload", etag="0" * 32)])
    with pytest.raises(StoreError, match="does not match its MD5 ETag") as err:
        store.get_file("k", tmp_path / "k.bin")
    assert store.url_of("k") in str(err.value)
    assert len(server.requests) >= 2
    assert list(tmp_path.iterdir()) == []  # nothing half-written at the destination
    server.answers[:] = [_s3_object(b"payload", etag="0" * 32), _s3_object(b"payload")]
    server.requests.clear()
    assert store.get_bytes("k") == b"payload"


def test_a_folder_symlinked_out_of_a_folder_store_is_not_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("keep")
    store = open_store(tmp_path / "store")
    store.put_text("runs/r/spec.yaml", "x")
    (tmp_path / "store" / "runs" / "link").symlink_to(outside, target_is_directory=True)
    for write in (
        lambda: store.put_text("runs/link/victim.txt", "overwritten"),
        lambda: store.delete("runs/link/victim.txt"),
    ):
        with pytest.raises(StoreError, match="symlink out of the store"):
            write()
    assert (outside / "victim.txt").read_text() == "keep"
    assert store.get_text("runs/r/spec.yaml") == "x"  # the store's own files still work


def test_put_if_absent_lets_exactly_one_of_racing_writers_win(store: Store) -> None:
    from concurrent.futures import ThreadPoolExecutor

    key = "runs/r/lease.json"
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: store.put_bytes_if_absent(key, b"%d" % i), range(8)))
    assert won.count(True) == 1
    assert store.get_bytes(key) == b"%d" % won.index(True)
    assert store.put_bytes_if_absent(key, b"later") is False
    assert store.list("runs/r/") == [key]  # no staging file left behind
