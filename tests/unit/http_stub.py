"""A local HTTP server standing in for a running `vllm serve` in the bench tests."""

from __future__ import annotations

import contextlib
import http.server
import threading


@contextlib.contextmanager
def serving(answer):
    """An HTTP server on a free port answering every GET with 200 and answer(path) (bytes);
    yields its URL, and is closed (connections refused) after."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = answer(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
