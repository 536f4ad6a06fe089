#!/usr/bin/env python
"""Export a ConvMixer checkpoint to ONNX, optionally checked against onnxruntime first.

A thin wrapper over `convmixer_pt.cli.export_onnx`; `--help` gives the usage.
"""

import sys

from convmixer_pt.cli.export_onnx import main

if __name__ == "__main__":
    sys.exit(main())
