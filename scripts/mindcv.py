#!/usr/bin/env python
"""Run a MindCV script (train.py, validate.py, infer.py) with ConvMixer in MindCV's model registry.

A thin wrapper over `convmixer_pt.cli.mindcv`; `--help` gives the usage.
"""

import sys

from convmixer_pt.cli.mindcv import main

if __name__ == "__main__":
    sys.exit(main())
