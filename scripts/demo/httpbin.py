#!/usr/bin/env python3
"""A stand-in for httpbin (the demo's cluster workload): GET /get and /headers answer JSON
in httpbin's shape (request headers, origin, url); /status/CODE answers CODE. Standard
library only, so the demo needs no image or package."""
import argparse
import http.server
import json


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--bind", default="0.0.0.0")
    a = p.parse_args()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?")[0]
            headers = {k.title(): v for k, v in self.headers.items()}
            if path == "/get":
                code, doc = 200, {
                    "args": {},
                    "headers": headers,
                    "origin": self.client_address[0],
                    "url": "http://%s%s" % (self.headers.get("Host", ""), self.path),
                }
            elif path == "/headers":
                code, doc = 200, {"headers": headers}
            elif path.startswith("/status/") and path[8:].isdigit():
                code, doc = int(path[8:]), {}
            else:
                code, doc = 404, {"error": "not found"}
            body = (json.dumps(doc, indent=2) + "\n").encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    http.server.ThreadingHTTPServer((a.bind, a.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
