#!/usr/bin/env python
"""Export a ConvMixer checkpoint's MindSpore model to MindIR.

A thin wrapper over `convmixer_pt.cli.export_mindir`; `--help` gives the usage.
"""

import sys

from convmixer_pt.cli.export_mindir import main

if __name__ == "__main__":
    sys.exit(main())
