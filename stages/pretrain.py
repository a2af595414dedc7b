"""DVC stage ``pretrain``: see dvc.yaml and dinoalign.stages.pretrain.

    python stages/pretrain.py [section.key=value ...]
"""

import sys

from dinoalign.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
