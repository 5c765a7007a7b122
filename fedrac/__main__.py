"""``python -m fedrac`` = the ``fedrac`` command."""
import sys

from .cli import main

sys.exit(main())
