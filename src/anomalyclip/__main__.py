"""``python -m anomalyclip``: the ``anomalyclip`` command."""

import sys

from anomalyclip.cli import main

if __name__ == "__main__":
    sys.exit(main())
