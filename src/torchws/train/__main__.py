"""``python -m torchws.train [flags]``: the same as ``torchws train [flags]`` (an entry point, not library code)."""

import sys

from torchws.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
