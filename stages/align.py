"""DVC stage ``align@<recipe>``: see dvc.yaml and dinoalign.stages.align.

    python stages/align.py align.recipe=talk2dino [section.key=value ...]
"""

import sys

from dinoalign.cli import main

if __name__ == "__main__":
    sys.exit(main(["align", *sys.argv[1:]]))
