"""`python -m torchws ...`: the same as the `torchws` console script."""

import sys

from torchws.cli import main

sys.exit(main())
