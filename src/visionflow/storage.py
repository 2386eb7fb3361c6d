"""The artifact store: datasets, checkpoints and models, in a local directory or in MinIO.

One interface, two backends, chosen by the root: `s3://bucket/prefix` goes to MinIO (or any S3
API) through the MinIO SDK, anything else is a local directory. Keys are relative, '/'-separated.

Writes are all-or-nothing: a local file is written beside its target and renamed into place,
and an S3 object appears only when its upload completes. So a reader never sees half a file.
Files (`put_file`: shards, checkpoints, ONNX and int8 models) carry their SHA-256, in the
object's metadata (`x-amz-meta-sha256`) or a hidden sidecar (`.<name>.sha256`) locally, and
`get_file` checks it while downloading: a corrupt copy is refused, never left at the target.
S3 credentials come only from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar
from urllib.parse import urlparse

from visionflow.retry import ATTEMPT_TIMEOUT_S, TransientError, call, is_transient


class StorageError(RuntimeError):
    """The store cannot be used: unreachable, missing bucket, missing key, bad credentials."""


class StorageUnreachable(StorageError, TransientError):
    """The S3 endpoint did not answer (it may later: steps retry this)."""


class ChecksumError(StorageError):
    """A downloaded file does not match the SHA-256 recorded for it: the stored copy is corrupt."""


class TooLarge(StorageError):
    """An object read whole is bigger than the caller's limit."""


SIDECAR = ".sha256"  # a local file's checksum: `.<name>.sha256` beside it


class ArtifactStore(Protocol):
    root: str

    def uri(self, key: str) -> str: ...
    def exists(self, key: str) -> bool: ...
    def put_file(self, local: Path, key: str) -> str: ...
    def get_file(self, key: str, local: Path, sha256: str | None = None) -> Path: ...
    def put_bytes(self, data: bytes, key: str) -> str: ...
    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def copy(self, src: str, dst: str) -> None: ...


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(src: BinaryIO, target: Path, expected: str | None, uri: str) -> Path:
    """Copy `src` to `target` atomically, refusing it unless its SHA-256 is `expected` (if given)."""

    def write(dst: BinaryIO) -> None:
        h = hashlib.sha256()
        for block in iter(lambda: src.read(1 << 20), b""):
            h.update(block)
            dst.write(block)
        if expected is not None and h.hexdigest() != expected:
            raise ChecksumError(
                f"{uri} is corrupt: its SHA-256 is {h.hexdigest()}, {expected} was recorded "
                "when it was written"
            )

    _atomic_write(target, write)
    return target


def _check_size(data: bytes, max_bytes: int | None, uri: str) -> bytes:
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLarge(f"{uri} is over {max_bytes:,} bytes: too big to be what it should be")
    return data


def _atomic_write(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalStore:
    def __init__(self, root: str | Path) -> None:
        self.path = Path(root).expanduser().resolve()
        self.root = str(self.path)

    def _p(self, key: str) -> Path:
        return self.path / key

    def uri(self, key: str) -> str:
        return str(self._p(key))

    def exists(self, key: str) -> bool:
        return self._p(key).is_file()

    def _sidecar(self, key: str) -> Path:
        path = self._p(key)
        return path.with_name(f".{path.name}{SIDECAR}")

    def put_file(self, local: Path, key: str) -> str:
        # Without a sidecar a file is read unchecked; with a stale one a good file would be
        # refused: so the old sidecar goes first and the new one comes after the file.
        self._sidecar(key).unlink(missing_ok=True)
        with open(local, "rb") as src:
            _atomic_write(self._p(key), lambda dst: shutil.copyfileobj(src, dst, 1 << 20))
        self._sidecar(key).write_text(sha256_file(local) + "\n")
        return self.uri(key)

    def get_file(self, key: str, local: Path, sha256: str | None = None) -> Path:
        if not self.exists(key):
            raise StorageError(f"not in the artifact store: {self.uri(key)}")
        sidecar = self._sidecar(key)
        if sha256 is None and sidecar.is_file():
            sha256 = sidecar.read_text().strip()
        with open(self._p(key), "rb") as src:
            return _download(src, Path(local), sha256, self.uri(key))

    def put_bytes(self, data: bytes, key: str) -> str:
        _atomic_write(self._p(key), lambda dst: dst.write(data))
        return self.uri(key)

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        if not self.exists(key):
            raise StorageError(f"not in the artifact store: {self.uri(key)}")
        with open(self._p(key), "rb") as f:
            return _check_size(
                f.read(max_bytes + 1 if max_bytes is not None else -1), max_bytes, self.uri(key)
            )

    def list(self, prefix: str = "") -> list[str]:
        base = self._p(prefix)
        if not base.exists():
            return []
        files = [base] if base.is_file() else base.rglob("*")
        return sorted(
            str(p.relative_to(self.path))
            for p in files
            if p.is_file()
            and not p.name.endswith(".part")
            and not (p.name.startswith(".") and p.name.endswith(SIDECAR))
        )

    def delete(self, key: str) -> None:
        self._p(key).unlink(missing_ok=True)
        self._sidecar(key).unlink(missing_ok=True)
        for parent in self._p(key).parents:  # keys, not folders: none is left empty
            if parent == self.path:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty (or gone)
                break

    def copy(self, src: str, dst: str) -> None:
        """Copy `src` to `dst` (replacing it), checksum included."""
        self._sidecar(dst).unlink(missing_ok=True)
        with open(self._p(src), "rb") as f:
            _atomic_write(self._p(dst), lambda out: shutil.copyfileobj(f, out, 1 << 20))
        if self._sidecar(src).is_file():
            shutil.copyfile(self._sidecar(src), self._sidecar(dst))


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _retried(method: _Method) -> _Method:
    """An S3Store method, retried through visionflow.retry on transient failures (a whole
    download or upload again: a dropped connection may cut one off midway)."""

    @functools.wraps(method)
    def retried(self: S3Store, *args: Any, **kwargs: Any) -> Any:
        shown = (f"<{len(a)} bytes>" if isinstance(a, bytes) else str(a) for a in args)
        operation = f"{method.__name__}({', '.join(shown)})"
        return call(
            lambda: method(self, *args, **kwargs), f"S3 endpoint {self.endpoint}", operation
        )

    return retried  # type: ignore[return-value]


class S3Store:
    """A bucket (and optional prefix) in MinIO or another S3 API, through the MinIO SDK.

    The bucket is looked for once, at once, when the store is opened; after that every call
    retries transient failures for the retry budget (visionflow.retry).
    """

    def __init__(self, root: str, endpoint: str | None) -> None:
        import urllib3
        from minio import Minio
        from minio.error import S3Error

        parsed = urlparse(root)
        self.root = root.rstrip("/")
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        if not endpoint:
            raise StorageError(
                f"{root} needs an S3 endpoint: set storage.endpoint or AWS_ENDPOINT_URL "
                "(e.g. http://minio.kubeflow:9000)"
            )
        ep = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        self.endpoint = f"{ep.scheme}://{ep.netloc}"
        access, secret = (
            os.environ.get("AWS_ACCESS_KEY_ID"),
            os.environ.get("AWS_SECRET_ACCESS_KEY"),
        )
        if not access or not secret:
            raise StorageError(
                f"{root} needs credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        # No retries here: calls retry through visionflow.retry, and the check below fails
        # at once (a store that never answered is misconfigured, not down).
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=ATTEMPT_TIMEOUT_S), retries=False
        )
        self._client = Minio(
            ep.netloc,
            access_key=access,
            secret_key=secret,
            secure=ep.scheme == "https",
            region=os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1",
            http_client=http,
        )
        self._S3Error = S3Error
        try:
            found = self._client.bucket_exists(self.bucket)
        except S3Error as err:
            raise StorageError(
                f"S3 endpoint {self.endpoint} refused access: {err.code} {err.message}"
            ) from None
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise StorageUnreachable(f"cannot reach S3 endpoint {self.endpoint}: {err}") from None
        if not found:
            raise StorageError(
                f"bucket {self.bucket!r} does not exist at {self.endpoint}; create it first "
                f"(e.g. `mc mb <alias>/{self.bucket}`)"
            )

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._k(key)}"

    @_retried
    def exists(self, key: str) -> bool:
        try:
            self._client.stat_object(self.bucket, self._k(key))
            return True
        except self._S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return False
            raise

    @_retried
    def put_file(self, local: Path, key: str) -> str:
        metadata = {"sha256": sha256_file(local)}  # sent as x-amz-meta-sha256
        self._client.fput_object(self.bucket, self._k(key), str(local), metadata=metadata)
        return self.uri(key)

    @_retried
    def get_file(self, key: str, local: Path, sha256: str | None = None) -> Path:
        try:
            data = self._client.get_object(self.bucket, self._k(key))
        except self._S3Error as err:
            if is_transient(err):
                raise
            raise StorageError(f"cannot read {self.uri(key)}: {err.code}") from None
        try:
            expected = sha256 or data.headers.get("x-amz-meta-sha256")
            return _download(data, Path(local), expected, self.uri(key))
        finally:
            data.close()
            data.release_conn()

    @_retried
    def put_bytes(self, data: bytes, key: str) -> str:
        self._client.put_object(self.bucket, self._k(key), io.BytesIO(data), len(data))
        return self.uri(key)

    @_retried
    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        try:
            resp = self._client.get_object(self.bucket, self._k(key))
        except self._S3Error as err:
            if is_transient(err):
                raise
            raise StorageError(f"cannot read {self.uri(key)}: {err.code}") from None
        try:
            data = resp.read(max_bytes + 1 if max_bytes is not None else None)
            return _check_size(data, max_bytes, self.uri(key))
        finally:
            resp.close()
            resp.release_conn()

    @_retried
    def list(self, prefix: str = "") -> list[str]:
        base = self._k(prefix)
        cut = len(self.prefix) + 1 if self.prefix else 0
        objs = self._client.list_objects(self.bucket, prefix=base, recursive=True)
        return sorted(o.object_name[cut:] for o in objs)

    @_retried
    def delete(self, key: str) -> None:
        self._client.remove_object(self.bucket, self._k(key))

    @_retried
    def copy(self, src: str, dst: str) -> None:
        """Copy `src` to `dst` in the server, metadata (the checksum) included."""
        from minio.commonconfig import CopySource

        self._client.copy_object(self.bucket, self._k(dst), CopySource(self.bucket, self._k(src)))


def open_store(root: str, endpoint: str | None = None) -> ArtifactStore:
    """The store at `root`: `s3://bucket[/prefix]` or a local directory."""
    if root.startswith("s3://"):
        return S3Store(root, endpoint or os.environ.get("AWS_ENDPOINT_URL"))
    if "://" in root:
        raise StorageError(
            f"unsupported artifact store {root!r}: use a local path or s3://bucket/prefix"
        )
    return LocalStore(root)


def split_uri(uri: str, endpoint: str | None = None) -> tuple[ArtifactStore, str]:
    """An artifact's URI as (store, key), with the store rooted at the bucket or at '/'."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        return open_store(f"s3://{parsed.netloc}", endpoint), parsed.path.lstrip("/")
    path = Path(uri).expanduser().resolve()
    return LocalStore(path.anchor), str(path.relative_to(path.anchor))
