# Guest entry point: python3 -I -S does not put this dir on sys.path.
import sys

sys.path.insert(0, "/usr/lib/cocoon")
from cocoon.agent.main import main  # noqa: E402

main()
