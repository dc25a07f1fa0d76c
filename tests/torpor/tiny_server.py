"""A tiny HTTP server for the local-workloads tests: 200 on /healthz, 404 elsewhere.

Flags make it misbehave the ways a real model server can: load slowly (--delay), ignore
SIGTERM (--ignore-sigterm), or leave a child process in its group (--child-pid-file).
Only the standard library, so the tests depend on nobody else's code.
"""

from __future__ import annotations

import argparse
import http.server
import signal
import subprocess
import sys
import time
from pathlib import Path


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/healthz" else 404
        body = b"ok\n" if status == 200 else b"not found\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the probe asks several times a second; keep the log file small


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="sleep before listening")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--child-pid-file", help="start a sleeping child; write its pid here")
    args = parser.parse_args()
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.child_pid_file:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        Path(args.child_pid_file).write_text(str(child.pid))
    time.sleep(args.delay)
    server = http.server.HTTPServer(("127.0.0.1", args.port), Handler)
    print(f"tiny_server listening on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
