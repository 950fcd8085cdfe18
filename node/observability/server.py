"""The node's HTTP endpoint: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

It listens on ``metrics_bind_address:metrics_port`` (127.0.0.1 by default: the figures are not
secret, but nothing outside the host needs them unless an operator says so) when
``metrics_port`` is set, in a thread of its own, so a slow database or scrape never holds up
DICOM traffic, and the container healthcheck's ``GET http://127.0.0.1:$PORT/readyz`` works
whenever the bind address is the loopback or every address (``0.0.0.0``).

``/metrics`` serves one registry per node: the process's event metrics
(:data:`node.observability.metrics.EVENTS`), this node's :class:`NodeCollector` (its database and
its model) and the standard process and Python collectors of prometheus_client. Requests are
not logged (a scrape every 15 s would drown the node's log).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import make_wsgi_app
from sqlalchemy.orm import Session, sessionmaker

from node.config import NodeConfig
from node.observability.collector import NodeCollector, worker_model
from node.observability.health import Liveness, Probes, liveness_problems, readiness
from node.observability.metrics import EVENTS
from node.queue.worker import Worker

log = logging.getLogger(__name__)

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
UNAVAILABLE = "503 Service Unavailable"
StartResponse = Callable[[str, list[tuple[str, str]]], Any]
Environ = dict[str, Any]


def node_registry(collector: NodeCollector) -> CollectorRegistry:
    """A registry with everything one node's ``/metrics`` shows."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(EVENTS)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    """A request thread still running at shutdown does not hold up the process."""


def _server_class(host: str, port: int) -> tuple[type[_Server], str]:
    """A server class of the address family ``host`` needs (IPv6 literals included)."""
    family, *_, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(_Server):
        address_family = family

    return Server, str(sockaddr[0])


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Endpoint:
    """``/metrics``, ``/healthz`` and ``/readyz`` of one node; :meth:`start`, then :meth:`stop`."""

    def __init__(self, config: NodeConfig, probes: Probes, collector: NodeCollector, alive: Liveness) -> None:
        self.config = config
        self.probes = probes
        self.alive = alive
        self._metrics = make_wsgi_app(node_registry(collector))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> str:
        """Listen and serve in a daemon thread; returns the base URL. OSError (naming the
        endpoint, which the CLI prints) when the address cannot be bound."""
        bind, port = self.config.metrics_bind_address, self.config.metrics_port
        try:
            server_class, host = _server_class(bind, port)
            server = make_server(host, port, self.app, server_class, handler_class=_QuietHandler)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or str(exc), f"metrics endpoint {bind}:{port}") from exc
        assert isinstance(server, _Server)
        self._server = server
        self.url = http_url(self.config.metrics_bind_address, server.server_port)
        self._thread = threading.Thread(target=server.serve_forever, name="mammonode-metrics", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        self._server = self._thread = None

    def app(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        """The WSGI application: three paths, GET only."""
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if path not in ("/metrics", "/healthz", "/readyz"):
            return _reply(start_response, "404 Not Found", TEXT, "not found: /metrics, /healthz, /readyz\n")
        if method != "GET":
            return _reply(start_response, "405 Method Not Allowed", TEXT, "GET only\n", [("Allow", "GET")])
        if path == "/metrics":
            return self._metrics(environ, start_response)
        if path == "/healthz":
            stopped = liveness_problems(self.alive)
            if stopped:
                return _reply(start_response, UNAVAILABLE, TEXT, f"stopped: {', '.join(stopped)}\n")
            return _reply(start_response, "200 OK", TEXT, "ok\n")
        result = readiness(self.probes)
        status = "200 OK" if result.ready else UNAVAILABLE
        return _reply(start_response, status, JSON, result.as_json() + "\n")


def _reply(
    start_response: StartResponse,
    status: str,
    content_type: str,
    body: str,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    data = body.encode("utf-8")
    start_response(
        status,
        [("Content-Type", content_type), ("Content-Length", str(len(data))), *(headers or [])],
    )
    return [data]


def start_endpoint(
    config: NodeConfig, sessions: sessionmaker[Session], *, worker: Worker | None, alive: Liveness
) -> Endpoint | None:
    """The node's endpoint, started, when ``config.metrics_port`` is set (else None).

    ``worker``: the node's scoring worker (None for roles that do not score); ``alive``: its
    loops, for ``/healthz``.
    """
    if not config.metrics_port:
        return None
    model = worker_model(worker) if worker is not None else None
    probes = Probes.for_role(config, sessions, model)
    endpoint = Endpoint(config, probes, NodeCollector(sessions, model), alive)
    url = endpoint.start()
    log.info("metrics and health on %s (/metrics, /healthz, /readyz)", url)
    return endpoint
