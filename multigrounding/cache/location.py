"""Where a store lives: a local folder or an object-store URL, and how each engine reaches it.

A ``Location`` is a local path, or a URL (``s3://bucket/prefix``, ``memory://name``, or any
scheme fsspec has installed) plus ``storage_options``: fsspec's option names, the ones zarr,
xarray and pandas users already write (``endpoint_url``, ``key``, ``secret``, ``token``,
``anon``, ``client_kwargs.region_name`` for S3). It is a small frozen dataclass, so it pickles
into dask tasks and every worker builds its own clients from it: the storage options travel
with the task, the clients never do.

From one location it gives

* ``open_group(mode)`` / ``zarr_store()`` — the zarr v3 store: local folders exactly as before
  (zarr's ``LocalStore``); ``s3://`` through obstore (zarr's ``ObjectStore``; measured faster
  than ``FsspecStore`` over s3fs, benchmarks/OBJECT_STORE_NOTES.md); any other scheme through
  fsspec (``FsspecStore``);
* ``kvstore_spec(key)`` — tensorstore's kvstore for the same place (``file`` locally, ``s3``
  with endpoint, region and credentials), or None where tensorstore has no driver for it;
* the few file operations the stores need beyond zarr: ``exists``, ``keys``, ``delete``,
  ``delete_all``, ``total_bytes``, ``read_bytes``, ``write_bytes``;
* ``obstore()`` — the raw obstore store under the prefix, for conditional writes (the lock).

Settings not in the storage options come the usual way: the endpoint and region from
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, read
once by ``parse`` into the options (so every engine, and every dask worker, uses the client's),
credentials from each engine's own default chain (environment, profile, instance role) on the
host where the engine runs, when no ``key`` is given.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from multigrounding.atomic import atomic_open
from multigrounding.datasets.records import is_url  # noqa: F401  (one rule for every layer)
from multigrounding.errors import MultigroundingError

# fsspec option names understood for s3:// (translated for obstore and tensorstore).
S3_OPTIONS = ("endpoint_url", "key", "secret", "token", "anon", "client_kwargs")
S3_CLIENT_KWARGS = ("endpoint_url", "region_name")
SECRET_OPTIONS = ("key", "secret", "token")
STORAGE_OPTIONS_HELP = ("JSON object of storage options for stores and images named by URL "
                        "(fsspec's names; for s3://: endpoint_url, key, secret, token, anon, "
                        "client_kwargs.region_name). Never saved. Without it: the environment "
                        "(AWS_* variables, ~/.aws, an instance role).")


class LocationError(MultigroundingError, ValueError):
    """A store location or its storage options cannot be used."""


class StoreUnreachableError(MultigroundingError, OSError):
    """An object store did not answer as asked (endpoint, bucket or credentials wrong)."""


def remote_errors() -> tuple[type[BaseException], ...]:
    """What a request to an object store raises when it fails (obstore's errors; fsspec's are
    OSErrors): caught where a store is first reached, and said in one line (``unreachable``)."""
    from obstore.exceptions import BaseError

    return (BaseError, OSError)


def parse_storage_options(text: str | None) -> dict:
    """``--storage-options JSON`` → a dict; a clear error for anything but a JSON object."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LocationError(f"--storage-options: not valid JSON ({exc.msg} at character "
                            f"{exc.pos}); give an object such as "
                            '\'{"endpoint_url": "http://127.0.0.1:9000"}\'') from None
    if not isinstance(value, dict):
        raise LocationError(f"--storage-options: a JSON object is needed, not "
                            f"{type(value).__name__}")
    return value


@dataclass(frozen=True)
class Location:
    """A local folder (``url`` is its path) or an object-store URL plus its storage options."""

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, where: "str | os.PathLike | Location",
              storage_options: Mapping[str, Any] | None = None) -> "Location":
        """A location from ``--cache`` text or a Path. Storage options are ignored for a local
        path (one ``--storage-options`` may serve a remote and a local store together)."""
        if isinstance(where, Location):
            return where
        text = os.fspath(where)
        scheme, sep, rest = text.partition("://")
        scheme = scheme.lower()
        if not sep or scheme in ("file", "local"):
            return cls(rest if sep else text, {})
        if scheme not in ("s3", "s3a"):  # s3 goes through obstore, not fsspec's s3fs
            _check_scheme(scheme, text)
        rest = rest.strip("/")
        if not rest:
            raise LocationError(f"{text}: no bucket or path after {scheme}://")
        options = dict(storage_options or {})
        if scheme in ("s3", "s3a"):
            _check_s3_options(text, options)
            options = _with_environment(options)
            scheme = "s3"
        return cls(f"{scheme}://{rest}", options)

    # ------------------------------------------------------------------ naming
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        """Secrets masked: a location is shown in logs, tracebacks and dask's dashboard."""
        shown = {k: ("***" if k in SECRET_OPTIONS else v) for k, v in self.storage_options.items()}
        return f"Location({self.url!r}, storage_options={shown!r})"

    @property
    def scheme(self) -> str:
        return self.url.partition("://")[0] if "://" in self.url else "file"

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def path(self) -> Path:
        """The local folder (only for local locations)."""
        if not self.is_local:
            raise LocationError(f"{self.url}: not a local path")
        return Path(self.url)

    def unreachable(self, exc: BaseException) -> StoreUnreachableError:
        """A one-line error for a request the store refused or never answered."""
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, FileNotFoundError) or type(exc).__name__ == "NotFoundError":
            bucket = self.url.partition("://")[2].partition("/")[0]
            return StoreUnreachableError(
                f"{self.url}: the bucket {bucket!r} does not exist at this endpoint (or these "
                "credentials cannot see it): create it first, or check the endpoint and the "
                "credentials (AWS_* environment variables, or --storage-options)")
        return StoreUnreachableError(
            f"{self.url}: the store did not answer ({reason}); check the bucket, the endpoint and "
            "the credentials: AWS_* environment variables, or --storage-options (never saved: "
            "give --storage-options again on every command, --resume too)")

    def joinpath(self, *parts: str) -> "Location":
        """A location below this one (``loc.joinpath("visual", "level0")``)."""
        if self.is_local:
            return Location(str(Path(self.url).joinpath(*parts)), {})
        return Location("/".join([self.url, *(p.strip("/") for p in parts)]),
                        dict(self.storage_options))

    @property
    def _bucket_and_prefix(self) -> tuple[str, str]:
        bucket, _, prefix = self.url.partition("://")[2].partition("/")
        return bucket, prefix

    # ------------------------------------------------------------------ zarr
    def zarr_store(self, read_only: bool = False):
        """The zarr v3 store for this location (for ``zarr.open_group(store, mode=...)``)."""
        from zarr.storage import FsspecStore, LocalStore, ObjectStore

        if self.is_local:
            return LocalStore(self.url, read_only=read_only)
        if self.scheme == "s3":
            return ObjectStore(self.obstore(), read_only=read_only)
        return FsspecStore.from_url(self.url, storage_options=dict(self.storage_options),
                                    read_only=read_only)

    def open_group(self, mode: str = "r"):
        """``zarr.open_group`` here; a local folder is opened exactly as before (by path)."""
        import zarr

        if self.is_local:
            return zarr.open_group(self.url, mode=mode)
        return zarr.open_group(self.zarr_store(read_only=mode == "r"), mode=mode)

    # ------------------------------------------------------------------ obstore
    def obstore(self):
        """The obstore store rooted at this location (conditional puts for the lock), or None
        where the location is not reached through obstore."""
        if self.scheme != "s3":
            return None
        from obstore.store import S3Store

        settings = _s3_settings(self.storage_options)
        bucket, prefix = self._bucket_and_prefix
        config: dict[str, Any] = {}
        if settings.endpoint:
            config["endpoint"] = settings.endpoint
        if settings.region:
            config["region"] = settings.region
        if settings.key is not None:
            config["access_key_id"] = settings.key
            config["secret_access_key"] = settings.secret
        if settings.token is not None:
            config["session_token"] = settings.token
        if settings.anon:
            config["skip_signature"] = True
        client = {"allow_http": True} if settings.endpoint.startswith("http://") else None
        return S3Store(bucket, prefix=prefix or None, config=config, client_options=client)

    # ------------------------------------------------------------------ tensorstore
    def kvstore_spec(self, key: str = "") -> dict | None:
        """tensorstore's kvstore spec for ``key`` under this location, or None when tensorstore
        has no driver for the scheme (read those with zarr-python instead)."""
        if self.is_local:
            return {"driver": "file", "path": str(Path(self.url, key)) if key else self.url}
        if self.scheme != "s3":
            return None
        settings = _s3_settings(self.storage_options)
        bucket, prefix = self._bucket_and_prefix
        path = "/".join(p for p in (prefix, key.strip("/")) if p)
        spec: dict[str, Any] = {"driver": "s3", "bucket": bucket,
                                "path": path + "/" if path else "",
                                "aws_credentials": _tensorstore_credentials(settings)}
        if settings.endpoint:
            spec["endpoint"] = settings.endpoint
        if settings.region:
            spec["aws_region"] = settings.region
        return spec

    # ------------------------------------------------------------------ small file operations
    def exists(self, key: str = "") -> bool:
        """Whether ``key`` exists (a file or object); ``""``: whether anything is here at all."""
        if self.is_local:
            return Path(self.url, key).exists()
        if not key:
            return not _sync(self.zarr_store().is_empty(""))
        return _sync(self.zarr_store().exists(key))

    def keys(self, prefix: str = "") -> list[str]:
        """Every file or object under ``prefix``, as keys relative to this location, sorted."""
        if self.is_local:
            root = Path(self.url)
            base = root / prefix if prefix else root
            if not base.exists():
                return []
            return sorted(p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(_sync(_collect(self.zarr_store().list_prefix, prefix)))

    def children(self) -> list[str]:
        """The names directly under this location (files and folders or prefixes), sorted: one
        listing request on an object store, however large the store."""
        if self.is_local:
            root = Path(self.url)
            return sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        return sorted(k.rstrip("/") for k in _sync(_collect(self.zarr_store().list_dir, "")))

    def delete(self, key: str) -> None:
        """Delete one file or object; a missing one is not an error."""
        if self.is_local:
            Path(self.url, key).unlink(missing_ok=True)
            return
        _sync(self.zarr_store().delete(key))

    def delete_all(self, keep: tuple[str, ...] = ()) -> None:
        """Delete everything here except the top-level names in ``keep`` (the held lock)."""
        if self.is_local:
            root = Path(self.url)
            if not root.exists():
                return
            for child in root.iterdir():
                if child.name in keep:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            return
        store = self.zarr_store()
        doomed = [k for k in _sync(_collect(store.list_prefix, "")) if k.split("/")[0] not in keep]
        if self.scheme == "s3":  # S3 deletes up to 1,000 objects a request
            import obstore

            obstore.delete(self.obstore(), doomed)
        else:
            _sync(_gather(store.delete(k) for k in doomed))

    def total_bytes(self) -> int:
        """Bytes stored under this location."""
        if self.is_local:
            return sum(p.stat().st_size for p in Path(self.url).rglob("*") if p.is_file())
        return int(_sync(self.zarr_store().getsize_prefix("")))

    def read_bytes(self, key: str) -> bytes:
        """The whole file or object; FileNotFoundError naming it when missing."""
        if self.is_local:
            return Path(self.url, key).read_bytes()
        from zarr.core.buffer import default_buffer_prototype

        buffer = _sync(self.zarr_store(read_only=True).get(key, default_buffer_prototype()))
        if buffer is None:
            raise FileNotFoundError(f"{self.url}/{key}: no such object")
        return buffer.to_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a whole file atomically (locally a temp file renamed; an object PUT is whole)."""
        if self.is_local:
            with atomic_open(Path(self.url, key), "wb") as handle:
                handle.write(data)
            return
        from zarr.core.buffer import default_buffer_prototype

        _sync(self.zarr_store().set(key, default_buffer_prototype().buffer.from_bytes(data)))


# ---------------------------------------------------------------------- helpers
def _check_scheme(scheme: str, text: str) -> None:
    import fsspec
    from fsspec.registry import known_implementations, registry

    if scheme not in registry and scheme not in known_implementations:
        raise LocationError(f"{text}: unknown storage scheme {scheme!r}; fsspec knows "
                            f"{', '.join(sorted(fsspec.available_protocols()))}")
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as exc:
        raise LocationError(f"{text}: {exc}") from None


def _check_s3_options(text: str, options: dict) -> None:
    unknown = sorted(set(options) - set(S3_OPTIONS))
    client = options.get("client_kwargs") or {}
    if not isinstance(client, dict):
        raise LocationError(f"{text}: storage option client_kwargs must be an object")
    unknown += [f"client_kwargs.{k}" for k in sorted(set(client) - set(S3_CLIENT_KWARGS))]
    if unknown:
        raise LocationError(
            f"{text}: storage option(s) {', '.join(unknown)} not supported for s3:// here; "
            f"use {', '.join(S3_OPTIONS[:-1])}, client_kwargs.region_name")
    if ("key" in options) != ("secret" in options):
        raise LocationError(f"{text}: storage options need both key and secret, or neither")


@dataclass(frozen=True)
class _S3Settings:
    endpoint: str
    region: str
    key: str | None
    secret: str | None
    token: str | None
    anon: bool


def _with_environment(options: dict) -> dict:
    """The endpoint and region from the usual AWS variables where the options name none, so
    that they travel with the location to dask workers (credentials do not: each host keeps
    its own chain unless ``key``/``secret`` are given)."""
    client = dict(options.get("client_kwargs") or {})
    if not (options.get("endpoint_url") or client.get("endpoint_url")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    if not client.get("region_name"):
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            client["region_name"] = region
            options["client_kwargs"] = client
    return options


def _s3_settings(options: Mapping[str, Any]) -> _S3Settings:
    client = options.get("client_kwargs") or {}
    endpoint = options.get("endpoint_url") or client.get("endpoint_url") or ""
    region = client.get("region_name") or ""
    return _S3Settings(endpoint=endpoint.rstrip("/"), region=region, key=options.get("key"),
                       secret=options.get("secret"), token=options.get("token"),
                       anon=bool(options.get("anon", False)))


_CREDENTIAL_FILES: dict[tuple, dict] = {}
_CREDENTIAL_LOCK = threading.Lock()


def _tensorstore_credentials(settings: _S3Settings) -> dict:
    """tensorstore takes no keys inline: explicit keys go in a private AWS profile file (0600,
    one per process and key, removed at exit); otherwise its default chain (environment,
    ~/.aws, instance role) applies."""
    if settings.anon:
        return {"type": "anonymous"}
    if settings.key is None:
        # Keys in this process's environment: read them directly (the default chain would try
        # ~/.aws first and log an error line per read where those files are missing).
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            return {"type": "environment"}
        return {"type": "default"}
    ident = (settings.key, settings.secret, settings.token)
    with _CREDENTIAL_LOCK:
        spec = _CREDENTIAL_FILES.get(ident)
        if spec is None:
            folder = tempfile.mkdtemp(prefix="multigrounding-aws-")
            atexit.register(shutil.rmtree, folder, True)
            lines = ["[default]", f"aws_access_key_id = {settings.key}",
                     f"aws_secret_access_key = {settings.secret}"]
            if settings.token is not None:
                lines.append(f"aws_session_token = {settings.token}")
            credentials = os.path.join(folder, "credentials")
            config = os.path.join(folder, "config")
            for name, text in ((credentials, "\n".join(lines)), (config, "[default]")):
                descriptor = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "w") as handle:
                    handle.write(text + "\n")
            spec = {"type": "profile", "profile": "default", "credentials_file": credentials,
                    "config_file": config}
            _CREDENTIAL_FILES[ident] = spec
        return dict(spec)


def _sync(coroutine):
    from zarr.core.sync import sync

    return sync(coroutine)


async def _collect(listing, prefix: str) -> list:
    """``listing(prefix)`` is called inside the event loop: zarr's ObjectStore starts its
    listing request when the iterator is made."""
    return [item async for item in listing(prefix)]


async def _gather(coroutines: Iterator) -> None:
    import asyncio

    await asyncio.gather(*coroutines)
