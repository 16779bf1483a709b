"""``python -m anomalyclip.cli``, the form ``torchrun -m anomalyclip.cli`` runs."""

import sys

from anomalyclip.cli import main

if __name__ == "__main__":
    sys.exit(main())
