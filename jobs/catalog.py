"""python -m jobs.catalog --input SRC --output DST --model MODEL [--config configs/catalog.yaml] [...]; see --help."""

import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main("catalog"))
