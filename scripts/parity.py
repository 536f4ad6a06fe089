#!/usr/bin/env python
"""Compare a ConvMixer checkpoint's PyTorch model with its MindSpore model (or two checkpoints), stage by stage.

A thin wrapper over `convmixer_pt.cli.parity`; `--help` gives the usage.
"""

import sys

from convmixer_pt.cli.parity import main

if __name__ == "__main__":
    sys.exit(main())
