"""cocoon: every container in its own lightweight VM.

Kept import-free on purpose: this package (with ``protocol`` and ``agent``) is
copied into the guest image, where each import costs boot time under TCG.
"""

__version__ = "0.1.0"
