#!/usr/bin/env python
"""Train with CoDeQ from a YAML config; see docs/TRAINING.md.

    python run_training.py --config configs/deadzone_resnet20.yaml --device cuda
"""

import sys

from codeq.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
