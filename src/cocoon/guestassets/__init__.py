"""Guest assets: the kernel and read-only root image every sandbox boots.

Built by `cocoon guest build` (our osbuilder), cached under the data dir by a
hash of their inputs, so they are rebuilt only when an input changes.
"""
