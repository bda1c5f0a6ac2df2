"""The contract layer: what the daemon and the client both import, and nothing else.

- :mod:`vattn.contract.errors`: the typed errors, one per gRPC status;
- the messages: ``vattn.v1.vattn_pb2`` and ``vattn.v1.channel_pb2``, generated
  from proto/ (the ``*_pb2_grpc`` stubs are transport, not contract);
- :mod:`vattn.contract.wire`: the fd channel's framing, protocol version and limits;
- :mod:`vattn.contract.layout`: a region's layout arithmetic (pages for
  tokens, slot stride, capacity, grant and spare order);
- :mod:`vattn.contract.units`: byte sizes as people write them.

Imports neither grpc nor torch (tests/unit/test_contract.py checks it).
"""
