"""``python -m moecollab``: see :mod:`moecollab.runner`."""

import sys

from .runner import main

sys.exit(main())
