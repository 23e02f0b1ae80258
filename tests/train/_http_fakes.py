"""Loopback HTTP servers for the reward-client tests: a stdlib ThreadingHTTPServer on a free port of
127.0.0.1, run in a daemon thread, whose answer to each POST is decided by a Python function of the request.
Always used as a context manager (shut down at exit)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeServer:
    """``handler(n, body: dict | bytes) -> (status, payload)`` answers request ``n`` (0-based); payload is
    JSON-encoded unless it is bytes.  A handler may instead return ``"drop"``: the connection is closed
    without an answer and the server stops listening (what a killed server looks like to a client)."""

    def __init__(self, handler):
        self.handler, self.count, self.in_flight, self.max_in_flight = handler, 0, 0, 0
        self.lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
                with outer.lock:
                    n = outer.count
                    outer.count += 1
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    ans = outer.handler(n, body)
                finally:
                    with outer.lock:
                        outer.in_flight -= 1
                if ans == "drop":
                    self.close_connection = True
                    self.connection.close()
                    threading.Thread(target=outer.httpd.shutdown, daemon=True).start()
                    outer.httpd.socket.close()
                    return
                status, payload = ans
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout) before the answer
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
