"""`python -m kvferry.serving.healthcheck HOST:PORT`: exit 0 when the service's grpc.health.v1 says SERVING.

Container health checks use it (no grpc_health_probe binary needed). When the service runs TLS, the
same environment the service reads (KVFERRY_TLS_CA, and KVFERRY_TLS_CERT/KVFERRY_TLS_KEY for mTLS,
KVFERRY_TLS_SERVER_NAME) makes the check speak TLS too."""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def is_serving(
    address: str,
    timeout: float = 3.0,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
) -> bool:
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    if credentials is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        channel = grpc.secure_channel(address, credentials, options=options)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kvferry.serving.healthcheck HOST:PORT", file=sys.stderr)
        return 2
    from kvferry.serving.security import client_credentials

    env = os.environ
    credentials = client_credentials(
        env.get("KVFERRY_TLS_CA") or None,
        env.get("KVFERRY_TLS_CERT") or None,
        env.get("KVFERRY_TLS_KEY") or None,
    )
    serving = is_serving(args[0], credentials=credentials, server_name=env.get("KVFERRY_TLS_SERVER_NAME"))
    print("SERVING" if serving else "NOT SERVING")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
