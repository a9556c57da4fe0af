"""`python -m pyopd ...` (and `torchrun -m pyopd ...`) is the `pyopd` command."""
import sys

from pyopd.cli import main

sys.exit(main())
