"""``python -m newslora``: the ``newslora`` command, also as launchers start it (``torchrun -m newslora train``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
