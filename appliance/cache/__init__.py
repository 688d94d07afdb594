"""The object cache (DESIGN section 2: caching wraps the chunk store and keeps its interface).

``memory.CachingChunkStore`` keeps plaintext chunks in memory by chunk id. The disk cache
sits below decryption, as a backend wrapper (``backends.diskcache``), so it only ever
holds what the providers hold. See docs/cache.md.
"""
