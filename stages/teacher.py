"""DVC stage ``teacher``: see dvc.yaml and dinoalign.stages.teacher.

    python stages/teacher.py [section.key=value ...]
"""

import sys

from dinoalign.cli import main

if __name__ == "__main__":
    sys.exit(main(["teacher", *sys.argv[1:]]))
