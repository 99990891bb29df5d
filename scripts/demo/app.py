#!/usr/bin/env python3
"""The demo's VM application: answers HTTP on one port.

GET /ready answers 200 while the file named by --unready does not exist, 503 while it does,
so the demo can make the WorkloadGroup's readiness probe fail and recover by creating and
removing that file. Every other path answers 200 with the VM's name.
"""
import argparse
import http.server
import os


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--unready", required=True, help="while this file exists, /ready is 503")
    p.add_argument("--name", default="vm")
    a = p.parse_args()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] == "/ready":
                ready = not os.path.exists(a.unready)
                code, body = (200, b"ready\n") if ready else (503, b"not ready\n")
            else:
                code, body = 200, f"hello from {a.name}\n".encode()
            self.send_response(code)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    http.server.ThreadingHTTPServer((a.bind, a.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
