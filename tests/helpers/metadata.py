"""A local cloud instance-metadata server for the preemption tests: AWS's IMDSv2 session tokens
and ``spot/instance-action`` (404 until a notice, then AWS's JSON document), on 127.0.0.1.

Every node of a one-machine test cluster reaches the same 127.0.0.1, where on a cloud each VM has
its own metadata server: ``notice_for`` picks the processes (by pid, from the TCP connection) that
get the notice, as if only their VM were being reclaimed."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional


class MetadataServer:
    """A local instance-metadata server: IMDSv2 tokens (PUT /latest/api/token, required on GET),
    404 on spot/instance-action until :meth:`announce`, then AWS's document."""

    def __init__(self, *, require_token: bool = True, notice_for: Optional[Callable[[Optional[int]], bool]] = None) -> None:
        self.document: str | None = None
        self.require_token = require_token
        self.notice_for = notice_for  # pid of the asking process (None: unknown) -> does its VM get the notice
        self.gets = 0
        self.tokens_issued = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_PUT(self) -> None:
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    server.tokens_issued += 1
                    self._answer(200, "token-123")
                else:
                    self._answer(400, "")

            def do_GET(self) -> None:
                server.gets += 1
                if server.require_token and self.headers.get("X-aws-ec2-metadata-token") != "token-123":
                    self._answer(401, "")
                elif (self.path.endswith("/spot/instance-action") and server.document is not None
                      and (server.notice_for is None or server.notice_for(server.client_pid(self.client_address[1])))):
                    self._answer(200, server.document)
                else:
                    self._answer(404, "Not Found")

            def _answer(self, code: int, body: str) -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/latest/meta-data/spot/instance-action"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def client_pid(self, port: int) -> Optional[int]:
        """The pid of the process whose TCP connection to this server comes from ``port``."""
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.raddr and conn.raddr.port == self.httpd.server_port:
                return conn.pid
        return None

    def announce(self, seconds: float, action: str = "terminate") -> float:
        when = datetime.fromtimestamp(int(time.time() + seconds), tz=timezone.utc)
        self.document = json.dumps({"action": action, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")})
        return when.timestamp()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
