"""DVC stage ``report``: metrics, curves and pictures of every recipe -> report/index.html
(see dvc.yaml and dinoalign.report).

    python stages/report.py [section.key=value ...]
"""

import sys

from dinoalign.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
