"""S3 protocol building blocks: SigV4, aws-chunked bodies, checksums, errors and XML.

These modules take plain values (method, raw path, query pairs, header mappings, ``read(n)``
coroutines) and know nothing of aiohttp or of the core (``appliance``); the request handlers
wire them to both. See ``frontends/s3/README.md`` for the decisions taken.
"""
