"""The OCI image store: registry pull, archive import, unpack, one block image per image."""
