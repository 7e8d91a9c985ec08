"""`python -m mal ...` (and `torchrun ... -m mal ...`) is the `mal` command."""
import sys

from .cli import main

sys.exit(main())
