"""A loopback stand-in for an OPA server: the part of OPA's REST API that
``OpaServerEngine`` uses, evaluated by rego-cpp.

The one mock of the policy tests, for what cannot exist on this machine: no registry it
reaches ships the OPA binary. It speaks the same HTTP contract (``PUT /v1/data/<path>``,
``PUT /v1/policies/<id>``, ``GET /v1/policies``, ``DELETE /v1/policies/<id>``,
``POST /v1/data/centinela/decision``) and evaluates exactly the modules and data pushed to
it, so it checks the client path (requests, parsing, failure handling, publishing), not
OPA's semantics. Of OPA's checks on a pushed module it makes only the parse: a module that
does not parse is refused with 400; OPA also refuses one that does not compile. Like OPA it
keeps what was pushed in memory only, and loses it on a restart
(:meth:`OpaStandIn.restart`); a query no module defines is a 200 without a ``result``.
``mode`` makes it fail on purpose.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from centinela.policy import rego_native
from centinela.policy.bundle import ENTRYPOINT


class OpaStandIn(ThreadingHTTPServer):
    """Loopback stand-in for OPA's REST API, backed by rego-cpp (see the module doc)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.modules: dict[str, str] = {}
        self.data: dict[str, Any] = {}
        self.mode = "ok"  # ok | error | slow | undefined | garbage
        self.lock = threading.Lock()
        self._compiled: Any = None
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def changed(self) -> None:
        """Forget the compiled policy (after a test changed ``modules`` or ``data``)."""
        with self.lock:
            self._compiled = None

    def restart(self) -> None:
        """What an OPA restart does to what was pushed to it: gone."""
        with self.lock:
            self.modules.clear()
            self.data.clear()
            self._compiled = None

    def evaluate(self, inp: Any) -> Any:
        """The decision for ``inp`` on what was pushed (``None``: undefined)."""
        with self.lock:
            if not self.modules:
                return None
            if self._compiled is None:
                built = rego_native.compile_bundle(self.modules, [self.data], [ENTRYPOINT])
                self._compiled = (built, rego_native.Interpreter())
            (_, compiled), runner = self._compiled
            rego_native.set_input(runner, inp)
            return rego_native.query_entrypoint(runner, compiled, ENTRYPOINT)

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: OpaStandIn

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, code: int, body: Any = None) -> None:
        raw = b"" if body is None else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def do_PUT(self) -> None:
        body = self._body()
        with self.server.lock:
            self.server._compiled = None
            if self.path.startswith("/v1/policies/"):
                policy_id = self.path.removeprefix("/v1/policies/")
                try:  # OPA refuses a module that does not parse (it checks more: see above)
                    rego_native.Interpreter().add_module(policy_id, body.decode())
                except Exception:
                    self._reply(400, {"code": "invalid_parameter", "message": "parse error"})
                    return
                self.server.modules[policy_id] = body.decode()
                self._reply(200, {})
                return
            parts = self.path.removeprefix("/v1/data/").strip("/").split("/")
            node = self.server.data
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = json.loads(body)
        self._reply(204)

    def do_GET(self) -> None:
        with self.server.lock:
            ids = sorted(self.server.modules)
        self._reply(200, {"result": [{"id": i} for i in ids]})

    def do_DELETE(self) -> None:
        with self.server.lock:
            self.server._compiled = None
            self.server.modules.pop(self.path.removeprefix("/v1/policies/"), None)
        self._reply(200, {})

    def do_POST(self) -> None:
        doc = json.loads(self._body())
        mode = self.server.mode
        if mode == "error":
            self._reply(500, {"code": "internal_error", "message": "boom"})
        elif mode == "slow":
            time.sleep(3.0)
            self._reply(200, {})
        elif mode == "undefined":
            self._reply(200, {})
        elif mode == "garbage":
            self._reply(200, {"result": {"allow": "sure"}})
        else:
            raw = self.server.evaluate(doc.get("input"))
            self._reply(200, {} if raw is None else {"result": raw})
