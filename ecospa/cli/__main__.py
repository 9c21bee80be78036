"""``python -m ecospa.cli``: the ``ecospa`` command."""
import sys

from ecospa.cli import main

sys.exit(main())
