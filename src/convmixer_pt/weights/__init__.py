"""Checkpoint files of both frameworks: the key map between layouts, PyTorch-side and MindSpore-side IO, every
format behind one reader and writer, parity between two models, and the converter built on them."""
