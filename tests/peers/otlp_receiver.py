"""A real OTLP/gRPC logs receiver (grpcio + opentelemetry-proto) for the access-log tests.

Prints `port <N>` once listening, then one JSON line per received log record:
{"body": ..., "attributes": {...}, "resource": {...}}.
"""
import json
import sys
from concurrent import futures

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc


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


server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(f"port {port}", flush=True)
server.wait_for_termination()
