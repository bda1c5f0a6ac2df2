"""The gRPC edge: serves the call table (vattnd.calls) on the worker and admin sockets.

Thin on purpose: each method of vattn.proto's Pool and Admin services is a
generic handler that runs the table's entry through the same
:class:`~vattnd.calls.Dispatcher` the fd channel uses, aborts with the
error's status and message, and queues a grant's page fds on the session's
fd channel (PageBatch datagrams tagged with the reply's grant_seq) before
returning the reply. Queuing never blocks, so a worker that waits for the
reply before it reads its fds cannot deadlock the daemon.
"""
from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vattn.v1 import vattn_pb2 as pb
from vattnd.calls import ADMIN, POOL, Dispatcher, Method

POOL_SERVICE = pb.DESCRIPTOR.services_by_name["Pool"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["Admin"].full_name


def _handler(dispatcher: Dispatcher, method: Method):
    def handle(request, context: grpc.ServicerContext):
        outcome = dispatcher.run(method, request, "grpc")
        if outcome.error is not None:
            context.abort(getattr(grpc.StatusCode, outcome.error.code), outcome.error.message)
        reply = outcome.reply
        if reply.fds:
            outcome.session.outbox.send_pages(reply.seq, reply.fds, reply.sent)
        return reply.message

    return grpc.unary_unary_rpc_method_handler(
        handle, request_deserializer=method.request.FromString, response_serializer=method.reply.SerializeToString)


def _service(name: str, methods, dispatcher: Dispatcher) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(name, {m.name: _handler(dispatcher, m) for m in methods})


def create_server(address: str, dispatcher: Dispatcher, max_workers: int = 16) -> tuple[grpc.Server, health.HealthServicer]:
    """Builds the gRPC server of the Pool service on ``address`` (e.g. ``unix:/run/vattnd/vattnd.sock``).

    Returns the server (not started) and its health servicer, which the
    caller sets to SERVING once the daemon is ready.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="vattnd-rpc"),
        options=[("grpc.so_reuseport", 0)],
    )
    server.add_generic_rpc_handlers((_service(POOL_SERVICE, POOL, dispatcher),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (POOL_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    return server, health_servicer


def create_admin_server(address: str, dispatcher: Dispatcher) -> grpc.Server:
    """The Admin service on its own socket (access is the socket file's permissions)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="vattnd-admin"))
    server.add_generic_rpc_handlers((_service(ADMIN_SERVICE, ADMIN, dispatcher),))
    reflection.enable_server_reflection((ADMIN_SERVICE, reflection.SERVICE_NAME), server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    return server
