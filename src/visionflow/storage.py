"""The artifact store: datasets, checkpoints and models, in a local directory or in MinIO.

One interface, two backends, chosen by the root: `s3://bucket/prefix` goes to MinIO (or any S3
API) through the MinIO SDK, anything else is a local directory. Keys are relative, '/'-separated.

Writes are all-or-nothing: a local file is written beside its target and renamed into place,
and an S3 object appears only when its upload completes. So a reader never sees half a file.
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
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

from visionflow.retry import ATTEMPT_TIMEOUT_S, TransientError, call, is_transient


class StorageError(RuntimeError):
    """The store cannot be used: unreachable, missing bucket, missing key, bad credentials."""


class StorageUnreachable(StorageError, TransientError):
    """The S3 endpoint did not answer (it may later: steps retry this)."""


class ArtifactStore(Protocol):
    root: str

    def uri(self, key: str) -> str: ...
    def exists(self, key: str) -> bool: ...
    def put_file(self, local: Path, key: str) -> str: ...
    def get_file(self, key: str, local: Path) -> Path: ...
    def put_bytes(self, data: bytes, key: str) -> str: ...
    def get_bytes(self, key: str) -> bytes: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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

    def put_file(self, local: Path, key: str) -> str:
        with open(local, "rb") as src:
            _atomic_write(self._p(key), lambda dst: shutil.copyfileobj(src, dst, 1 << 20))
        return self.uri(key)

    def get_file(self, key: str, local: Path) -> Path:
        if not self.exists(key):
            raise StorageError(f"not in the artifact store: {self.uri(key)}")
        with open(self._p(key), "rb") as src:
            _atomic_write(Path(local), lambda dst: shutil.copyfileobj(src, dst, 1 << 20))
        return Path(local)

    def put_bytes(self, data: bytes, key: str) -> str:
        _atomic_write(self._p(key), lambda dst: dst.write(data))
        return self.uri(key)

    def get_bytes(self, key: str) -> bytes:
        if not self.exists(key):
            raise StorageError(f"not in the artifact store: {self.uri(key)}")
        return self._p(key).read_bytes()

    def list(self, prefix: str = "") -> list[str]:
        base = self._p(prefix)
        if not base.exists():
            return []
        files = [base] if base.is_file() else base.rglob("*")
        return sorted(
            str(p.relative_to(self.path))
            for p in files
            if p.is_file() and not p.name.endswith(".part")
        )

    def delete(self, key: str) -> None:
        self._p(key).unlink(missing_ok=True)


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _retried(method: _Method) -> _Method:
    """An S3Store method, retried through visionflow.retry on transient failures (a whole
    download or upload again: a dropped connection may cut one off midway)."""

    @functools.wraps(method)
    def retried(self: S3Store, *args: Any) -> Any:
        shown = (f"<{len(a)} bytes>" if isinstance(a, bytes) else str(a) for a in args)
        operation = f"{method.__name__}({', '.join(shown)})"
        return call(lambda: method(self, *args), f"S3 endpoint {self.endpoint}", operation)

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
        self._client.fput_object(self.bucket, self._k(key), str(local))
        return self.uri(key)

    @_retried
    def get_file(self, key: str, local: Path) -> Path:
        local = Path(local)
        try:
            data = self._client.get_object(self.bucket, self._k(key))
        except self._S3Error as err:
            if is_transient(err):
                raise
            raise StorageError(f"cannot read {self.uri(key)}: {err.code}") from None
        try:
            _atomic_write(local, lambda dst: shutil.copyfileobj(data, dst, 1 << 20))
        finally:
            data.close()
            data.release_conn()
        return local

    @_retried
    def put_bytes(self, data: bytes, key: str) -> str:
        self._client.put_object(self.bucket, self._k(key), io.BytesIO(data), len(data))
        return self.uri(key)

    @_retried
    def get_bytes(self, key: str) -> bytes:
        try:
            resp = self._client.get_object(self.bucket, self._k(key))
        except self._S3Error as err:
            if is_transient(err):
                raise
            raise StorageError(f"cannot read {self.uri(key)}: {err.code}") from None
        try:
            return resp.read()
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
