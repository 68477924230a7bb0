"""python -m jobs.digitize --input SRC --output DST --model MODEL [--config configs/digitize.yaml] [...]; see --help."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main("digitize"))
