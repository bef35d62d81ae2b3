"""``python -m oodlab`` = the ``oodlab`` command."""

import sys

from oodlab.cli import main

sys.exit(main())
