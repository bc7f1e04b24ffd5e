"""``python -m fedsim.cli``: the same as the ``fedsim`` command."""

import sys

from fedsim.cli.main import main

sys.exit(main())
