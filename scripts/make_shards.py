#!/usr/bin/env python
"""Write ImageFolder splits as WebDataset tar shards with their index.

A thin wrapper over `convmixer_pt.cli.make_shards`; `--help` gives the usage.
"""

import sys

from convmixer_pt.cli.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
