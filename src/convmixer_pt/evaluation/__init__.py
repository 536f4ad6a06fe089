"""Evaluation: the two preprocessing protocols, the one evaluation loop, checkpoint validation in either
framework, ImageNet val preparation, and speed against timm."""
