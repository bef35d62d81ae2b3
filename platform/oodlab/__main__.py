"""``python -m oodlab`` = the ``oodlab`` command."""

import sys

from oodlab.cli.main import main

sys.exit(main())
