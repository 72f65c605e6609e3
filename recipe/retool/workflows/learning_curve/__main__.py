"""``python -m recipe.retool.workflows.learning_curve`` (``make dapo-curve``)."""

import sys

from recipe.retool.workflows.learning_curve.proof import main

sys.exit(main())
