"""DVC stage ``evaluate@<recipe>``: see dvc.yaml and dinoalign.stages.evaluate.

python stages/evaluate.py [section.key=value ...]   e.g. "evaluate.recipes=[talk2dino]"
"""

import sys

from dinoalign.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
