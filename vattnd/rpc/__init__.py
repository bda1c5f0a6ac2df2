"""The gRPC edge: the Pool and Admin services over the call table, ``create_server``."""
