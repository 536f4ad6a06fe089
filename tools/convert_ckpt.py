#!/usr/bin/env python
"""Convert ConvMixer checkpoints between PyTorch and MindSpore, exactly.

A thin wrapper over `convmixer_pt.cli.convert`; `--help` gives the usage.
"""

import sys

from convmixer_pt.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
