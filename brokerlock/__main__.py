"""``python -m brokerlock``: the same as the ``brokerlock`` command."""

import sys

from .cli import main

sys.exit(main())
