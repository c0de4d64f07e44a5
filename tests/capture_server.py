"""A loopback server that records what a client really sends (tests and by hand).

Each request's method, path, headers and JSON body is written to `folder/NNN.json` in arrival
order. It answers a minimal valid reply in the dialect of the path (an OpenAI Responses stream
for `/v1/responses`, an Anthropic Messages stream for `/v1/messages`, a model list for
`/v1/models`), or, with `upstream`, forwards the request to a real server and relays its answer
chunk by chunk, recording the status. Run by hand:

    python tests/capture_server.py FOLDER [--port N] [--upstream http://127.0.0.1:8080]
"""

import argparse
import http.client
import itertools
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPLY = "Hello from the capture server."


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def responses_stream(model: str) -> list[bytes]:
    """The OpenAI Responses event sequence for one text reply."""
    rid, mid = "resp_capture", "msg_capture"
    base = {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "output": [],
    }
    part = {"type": "output_text", "text": REPLY, "annotations": []}
    item = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [part],
    }
    usage = {
        "input_tokens": 1,
        "output_tokens": 1,
        "total_tokens": 2,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    where = {"item_id": mid, "output_index": 0, "content_index": 0}
    events = [
        ("response.created", {"response": {**base, "status": "in_progress"}}),
        ("response.in_progress", {"response": {**base, "status": "in_progress"}}),
        (
            "response.output_item.added",
            {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
        ),
        ("response.content_part.added", {**where, "part": {**part, "text": ""}}),
        ("response.output_text.delta", {**where, "delta": REPLY}),
        ("response.output_text.done", {**where, "text": REPLY}),
        ("response.content_part.done", {**where, "part": part}),
        ("response.output_item.done", {"output_index": 0, "item": item}),
        (
            "response.completed",
            {"response": {**base, "status": "completed", "output": [item], "usage": usage}},
        ),
    ]
    return [
        sse(name, {"type": name, "sequence_number": n, **data})
        for n, (name, data) in enumerate(events)
    ]


def messages_stream(model: str) -> list[bytes]:
    """The Anthropic Messages event sequence for one text reply."""
    usage = {
        "input_tokens": 1,
        "output_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0,
    }
    message = {
        "id": "msg_capture",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    events = [
        ("message_start", {"message": message}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": REPLY}}),
        ("content_block_stop", {"index": 0}),
        (
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 1},
            },
        ),
        ("message_stop", {}),
    ]
    return [sse(name, {"type": name, **data}) for name, data in events]


class Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder, upstream: str | None = None, port: int = 0):
        super().__init__(("127.0.0.1", port), Handler)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.upstream = urllib.parse.urlsplit(upstream) if upstream else None
        self.count = itertools.count()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> "Recorder":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def records(self) -> list[dict]:
        """Every request recorded so far, in arrival order."""
        return [json.loads(f.read_text()) for f in sorted(self.folder.glob("[0-9]*.json"))]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Recorder

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.handle_any()

    def do_POST(self):
        self.handle_any()

    def do_HEAD(self):
        self.handle_any()

    def do_DELETE(self):
        self.handle_any()

    def handle_any(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        with self.server.lock:
            n = next(self.server.count)
        record = {
            "n": n,
            "method": self.command,
            "path": self.path,
            "headers": dict(self.headers.items()),
            "body": body,
        }
        path = self.server.folder / f"{n:03d}.json"
        path.write_text(json.dumps(record, indent=1))
        if self.server.upstream:
            record["status"], record["reply"] = self.forward(raw)
        else:
            record["status"] = self.answer(body)
        path.write_text(json.dumps(record, indent=1))

    def forward(self, raw: bytes):
        """Relay to the upstream server; returns its status and the reply's text (streams
        included)."""
        up = self.server.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=600)
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in ("host", "content-length", "connection")
        }
        conn.request(self.command, self.path, body=raw or None, headers=headers)
        reply = conn.getresponse()
        self.send_response(reply.status)
        for k, v in reply.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                self.send_header(k, v)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        seen = bytearray()
        while chunk := reply.read1(65536):
            seen += chunk
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        conn.close()
        return reply.status, seen.decode(errors="replace")

    def answer(self, body) -> int:
        path = urllib.parse.urlsplit(self.path).path
        model = body.get("model", "capture") if isinstance(body, dict) else "capture"
        if self.command == "POST" and path == "/v1/responses":
            return self.send_stream(responses_stream(model))
        if self.command == "POST" and path == "/v1/messages":
            return self.send_stream(messages_stream(model))
        if self.command in ("GET", "HEAD") and path == "/v1/models":
            return self.send_json(
                200, {"object": "list", "data": [{"id": "capture", "object": "model"}]}
            )
        if self.command == "HEAD":
            return self.send_json(200, {})
        return self.send_json(
            404, {"error": {"type": "not_found_error", "message": f"no route {path}"}}
        )

    def send_stream(self, events: list[bytes]) -> int:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(sum(map(len, events))))
        self.end_headers()
        for event in events:
            self.wfile.write(event)
        return 200

    def send_json(self, status: int, data: dict) -> int:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)
        return status


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream")
    args = parser.parse_args()
    server = Recorder(args.folder, args.upstream, args.port)
    print(server.url, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
