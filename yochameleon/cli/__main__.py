"""``python -m yochameleon.cli``: the same as the ``yochameleon`` command."""

import sys

from yochameleon.cli import main

sys.exit(main())
