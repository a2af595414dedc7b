"""DVC stage ``embed``: see dvc.yaml and dinoalign.stages.embed.

    python stages/embed.py [section.key=value ...]
"""

import sys

from dinoalign.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
