"""The in-guest agent: PID 1 of every cocoon VM.

Imports only the stdlib and ``cocoon.protocol``: it runs from the read-only
guest image on the guest's Python 3.11, where every import costs boot time.
"""
