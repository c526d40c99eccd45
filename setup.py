"""Build the optional C extension beside the pure-Python package (the rest is in pyproject.toml).

``tracemesh.collector._otlpc`` checks and encodes OTLP trace requests in C (see collector/_otlpc.c).
``tracemesh.collector._crc32`` is zlib's CRC-32 for the write-ahead log, folded with PCLMULQDQ
(see collector/_crc32.c). Both are optional: without a compiler the install still succeeds, and the
collector falls back to its Python path and to zlib.crc32.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("tracemesh.collector._otlpc", ["collector/_otlpc.c"], optional=True, extra_compile_args=["-O2", "-std=gnu11"]),
    Extension("tracemesh.collector._crc32", ["collector/_crc32.c"], optional=True, extra_compile_args=["-O2", "-std=gnu11"]),
])
