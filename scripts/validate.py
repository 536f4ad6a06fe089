#!/usr/bin/env python
"""Evaluate a ConvMixer checkpoint in PyTorch or MindSpore.

A thin wrapper over `convmixer_pt.cli.validate`; `--help` gives the usage.
"""

import sys

from convmixer_pt.cli.validate import main

if __name__ == "__main__":
    sys.exit(main())
