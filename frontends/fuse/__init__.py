"""The FUSE frontend: the pool mounted as a folder (pyfuse3 in asyncio mode)."""
