"""DVC stage ``prepare``: the configured data source -> ``artifacts/pairs/``.

    python stages/prepare.py [section.key=value ...]
"""

import sys

from dinoalign.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
