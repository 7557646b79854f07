"""``python -m autosculpt ...`` runs the ``autosculpt`` command (also under ``torchrun -m autosculpt``)."""
import sys

from .cli import main

sys.exit(main())
