"""gRPC layer: the servicer and ``create_server``."""
