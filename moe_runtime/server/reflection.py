"""Server reflection under both `grpc.reflection.v1` and `grpc.reflection.v1alpha`.

grpcio-reflection 1.85 ships only v1alpha (which stock grpcurl 1.8 uses); newer clients (grpcurl >= 1.9,
Postman) ask v1 first. The two protocols are the same messages under another package name, so the v1
service reuses the v1alpha servicer and its message (de)serializers on the v1 method path.
"""

from __future__ import annotations

import grpc
from grpc_reflection.v1alpha import reflection as reflection_v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as rpb
from grpc_reflection.v1alpha._async import ReflectionServicer

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE = reflection_v1alpha.SERVICE_NAME


def enable_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    names = [*service_names, V1ALPHA_SERVICE, V1_SERVICE]
    servicer = ReflectionServicer(names)
    for service in (V1ALPHA_SERVICE, V1_SERVICE):
        handler = grpc.method_handlers_generic_handler(service, {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=rpb.ServerReflectionRequest.FromString,
                response_serializer=rpb.ServerReflectionResponse.SerializeToString,
            ),
        })
        server.add_generic_rpc_handlers((handler,))
