#!/usr/bin/env python
"""Fast path against plain PyTorch over a short training run.

A thin wrapper over `convmixer_pt.cli.check_fast_training`; `--help` gives the usage.
"""

import sys

from convmixer_pt.cli.check_fast_training import main

if __name__ == "__main__":
    sys.exit(main())
