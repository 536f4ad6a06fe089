#!/usr/bin/env python
"""Convert ConvMixer checkpoints between PyTorch and MindSpore, exactly.

A thin wrapper over `convmixer_pt.cli.convert`; `--help` gives the usage.
"""

from convmixer_pt.cli.convert import command

if __name__ == "__main__":
    command()
