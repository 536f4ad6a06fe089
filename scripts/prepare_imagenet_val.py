#!/usr/bin/env python
"""Put the ILSVRC2012 validation images into the ImageFolder layout.

A thin wrapper over `convmixer_pt.cli.prepare_imagenet_val`; `--help` gives the usage.
"""

import sys

from convmixer_pt.cli.prepare_imagenet_val import main

if __name__ == "__main__":
    sys.exit(main())
