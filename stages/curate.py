"""DVC stage ``curate``: see dvc.yaml and dinoalign.stages.curate.

    python stages/curate.py [section.key=value ...]
"""

import sys

from dinoalign.cli import main

if __name__ == "__main__":
    sys.exit(main(["curate", *sys.argv[1:]]))
