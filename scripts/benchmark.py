#!/usr/bin/env python
"""Throughput of this project's ConvMixer against timm's.

A thin wrapper over `convmixer_pt.cli.benchmark`; `--help` gives the usage.
"""

import sys

from convmixer_pt.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
