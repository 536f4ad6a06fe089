#!/usr/bin/env python
"""Train a ConvMixer with the paper's recipe.

A thin wrapper over `convmixer_pt.cli.train`; `--help` gives the usage.
"""

import sys

from convmixer_pt.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
