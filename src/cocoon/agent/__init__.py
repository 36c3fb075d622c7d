"""The in-guest agent: PID 1 of every cocoon VM.

Imports only cheap stdlib modules and ``cocoon.protocol`` (framing, messages):
it runs from the read-only guest image on the guest's Python 3.11 under TCG,
where every import costs boot time. Hence threads and blocking I/O rather than
asyncio, and no logging, typing, dataclasses, pathlib, shutil or subprocess.
"""
