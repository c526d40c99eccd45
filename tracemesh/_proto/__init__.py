"""Generated protobuf and gRPC code for the mesh's own protocols (``proto/`` in the repository).

Do not edit: regenerate with ``python proto/generate.py`` (needs grpcio-tools); a test checks
that these files are what the ``.proto`` files generate.
"""
