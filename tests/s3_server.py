"""A real S3 server on the loopback address for tests and benchmarks: moto's ThreadedMotoServer.

The server listens on 127.0.0.1 on a free port. Nothing global is set: clients get the endpoint
and dummy credentials through ``storage_options`` (fsspec's names, the form every
multigrounding location takes), so tests never touch the user's AWS environment. zarr-python's
own S3 tests start the same server (module-scoped, a fixed port, credentials in ``os.environ``);
here it is session-scoped on a free port, with a fresh bucket per test instead of a reset.

Two additions wrap moto's WSGI application:

* **Conditional writes are serialised.** moto checks ``If-None-Match`` / ``If-Match`` and then
  writes, in two steps with no lock between them (moto 5.2.5, ``s3/responses.py``
  ``put_object``): measured here, 61 of 200 four-way races of ``If-Match`` puts on one key had
  more than one winner. S3 itself makes a conditional write atomic, and the object-store lock
  relies on that, so requests that carry a precondition (and deletes) run one at a time. Plain
  reads and writes stay concurrent.
* **Traffic is counted**: requests and body bytes in each direction (``traffic()``, also served
  as JSON at ``GET /_traffic``), which is what the benchmarks report as bytes on the wire.

``S3ServerProcess`` runs the same server in a child process (``python tests/s3_server.py``), so
that a benchmark's client does not share its interpreter (and GIL) with the server.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import urllib.request
import uuid
from dataclasses import asdict, dataclass

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


@dataclass
class Traffic:
    requests: int = 0
    bytes_in: int = 0      # request bodies received by the server (uploads)
    bytes_out: int = 0     # response bodies sent by the server (downloads)

    def __sub__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.requests - other.requests, self.bytes_in - other.bytes_in,
                       self.bytes_out - other.bytes_out)


class _Middleware:
    """Serialise conditional writes and deletes; count requests and body bytes."""

    def __init__(self, app):
        self.app = app
        self.writes = threading.Lock()
        self.counter = threading.Lock()
        self.traffic = Traffic()

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") == "/_traffic":
            with self.counter:
                body = json.dumps(asdict(self.traffic)).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        conditional = ("HTTP_IF_MATCH" in environ or "HTTP_IF_NONE_MATCH" in environ) \
            and environ.get("REQUEST_METHOD") in ("PUT", "POST")
        with self.counter:
            self.traffic.requests += 1
            self.traffic.bytes_in += int(environ.get("CONTENT_LENGTH") or 0)
        if conditional or environ.get("REQUEST_METHOD") == "DELETE":
            with self.writes:
                body = list(self.app(environ, start_response))
        else:
            body = self.app(environ, start_response)
        return self._count(body)

    def _count(self, body):
        try:
            for piece in body:
                with self.counter:
                    self.traffic.bytes_out += len(piece)
                yield piece
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()


class _Clients:
    """What a test needs from a server: options, a boto3 client, fresh buckets."""

    endpoint_url = ""

    @property
    def storage_options(self) -> dict:
        """fsspec-style options that reach this server with the dummy credentials."""
        return {"endpoint_url": self.endpoint_url, "key": ACCESS_KEY, "secret": SECRET_KEY,
                "client_kwargs": {"region_name": REGION}}

    def client(self):
        """A boto3 S3 client for this server (test setup and inspection)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def new_bucket(self, prefix: str = "test") -> str:
        """Create an empty bucket with a name no other test uses, and return the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalS3(_Clients):
    """``with LocalS3() as s3:`` a moto S3 server; ``s3.new_bucket()``, ``s3.storage_options``."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._middleware: _Middleware | None = None
        self.endpoint_url = ""

    def start(self) -> "LocalS3":
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request
        self._server.start()
        # No client knows the port yet, so no request can pass unwrapped.
        wsgi = self._server._server
        self._middleware = _Middleware(wsgi.app)
        wsgi.app = self._middleware
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()

    def traffic(self) -> Traffic:
        """Requests and body bytes so far (subtract two readings for one interval)."""
        middleware = self._middleware
        with middleware.counter:
            return Traffic(**vars(middleware.traffic))


class S3ServerProcess(_Clients):
    """The same server in a child process; it stops when this side closes its stdin."""

    def __init__(self):
        self._process: subprocess.Popen | None = None

    def start(self) -> "S3ServerProcess":
        self._process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
        self.endpoint_url = self._process.stdout.readline().strip()
        if not self.endpoint_url.startswith("http://"):
            self.stop()
            raise RuntimeError("the S3 server process did not start")
        return self

    def stop(self) -> None:
        if self._process is not None:
            self._process.stdin.close()
            self._process.wait(timeout=30)
            self._process = None

    def traffic(self) -> Traffic:
        with urllib.request.urlopen(f"{self.endpoint_url}/_traffic") as response:
            return Traffic(**json.loads(response.read()))


if __name__ == "__main__":
    with LocalS3() as server:
        print(server.endpoint_url, flush=True)
        sys.stdin.read()          # serve until the parent closes the pipe
