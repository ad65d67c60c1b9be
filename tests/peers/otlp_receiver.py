"""A real OTLP/gRPC receiver (grpcio + opentelemetry-proto) for the access-log and trace tests.

Prints `port <N>` once listening, then one JSON line per received log record:
{"body": ..., "attributes": {...}, "resource": {...}}, and one per received span:
{"span": {"trace_id": hex, "span_id": hex, "parent_span_id": hex, "name": ..., "kind": n,
"attributes": {...}, "status": n, "trace_state": ..., "start": ns, "end": ns}, "resource": {...},
"scope": name}.
"""
import json
import sys
from concurrent import futures

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def Export(self, request, context):
        for resource_logs in request.resource_logs:
            resource = {kv.key: value(kv.value) for kv in resource_logs.resource.attributes}
            for scope_logs in resource_logs.scope_logs:
                for record in scope_logs.log_records:
                    line = {
                        "body": value(record.body),
                        "attributes": {kv.key: value(kv.value) for kv in record.attributes},
                        "resource": resource,
                        "time_unix_nano": record.time_unix_nano,
                    }
                    print(json.dumps(line), flush=True)
        return logs_service_pb2.ExportLogsServiceResponse()


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            resource = {kv.key: value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    line = {
                        "span": {
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "name": span.name,
                            "kind": span.kind,
                            "attributes": {kv.key: value(kv.value) for kv in span.attributes},
                            "status": span.status.code,
                            "trace_state": span.trace_state,
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                        },
                        "resource": resource,
                        "scope": scope_spans.scope.name,
                    }
                    print(json.dumps(line), flush=True)
        return trace_service_pb2.ExportTraceServiceResponse()


server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(f"port {port}", flush=True)
server.wait_for_termination()
