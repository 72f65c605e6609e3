"""``python -m recipe.retool.launch check ...`` (:func:`recipe.retool.launch.check.main`)."""

import sys

from recipe.retool.launch.check import main

sys.exit(main())
