#!/usr/bin/env python3
"""A small OTLP/HTTP trace receiver for the tests: decodes each ExportTraceServiceRequest with
the official generated classes (PyPI package opentelemetry-proto) and writes one JSON line per
span to stdout. Also one line per TCP connection accepted, so a test can tell that nothing
connected at all.

    python receiver.py            # listens on 127.0.0.1, a free port
    -> {"listening": PORT}
    -> {"connection": true}
    -> {"request": {"path": "/v1/traces", "content_type": ..., "headers": {...}}}
    -> {"span": {"trace_id": hex, "span_id": hex, "parent_span_id": hex, "name": ...,
                 "kind": ..., "attributes": {...}, "links": [{"trace_id", "span_id"}],
                 "resource": {...}, "scope": ..., "status": ..., "start_ns", "end_ns"}}

Stops on SIGTERM or when stdin closes. With --count (for load tests), writes no line per span
or request, only {"spans": N, "requests": N} at the end.
"""

import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

OUT = threading.Lock()
COUNT_ONLY = "--count" in sys.argv[1:]
TOTALS = {"spans": 0, "requests": 0}


def emit(obj):
    with OUT:
        sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
        sys.stdout.flush()


def any_value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def attributes(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        if COUNT_ONLY:
            req = trace_service_pb2.ExportTraceServiceRequest()
            req.ParseFromString(body)
            n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
            with OUT:
                TOTALS["spans"] += n
                TOTALS["requests"] += 1
            self.reply_ok()
            return
        emit({"request": {
            "path": self.path,
            "content_type": self.headers.get("content-type"),
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }})
        if self.path != "/v1/traces":
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        req = trace_service_pb2.ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    emit({"span": {
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "name": s.name,
                        "kind": s.kind,
                        "attributes": attributes(s.attributes),
                        "links": [{
                            "trace_id": link.trace_id.hex(),
                            "span_id": link.span_id.hex(),
                        } for link in s.links],
                        "dropped_links": s.dropped_links_count,
                        "resource": resource,
                        "scope": ss.scope.name,
                        "status": s.status.code,
                        "start_ns": s.start_time_unix_nano,
                        "end_ns": s.end_time_unix_nano,
                    }})
        self.reply_ok()

    def reply_ok(self):
        out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def verify_request(self, request, client_address):
        if not COUNT_ONLY:
            emit({"connection": True})
        return True


def main():
    server = Server(("127.0.0.1", 0), Handler)
    emit({"listening": server.server_address[1]})
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())

    def watch_stdin():
        sys.stdin.read()
        server.shutdown()

    threading.Thread(target=watch_stdin, daemon=True).start()
    server.serve_forever()
    if COUNT_ONLY:
        emit(TOTALS)


if __name__ == "__main__":
    main()
