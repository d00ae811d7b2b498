"""Tile encoders: a torch-free registry of named specs (``registry``) and the model wrapper
that owns resizing and normalisation (``model``). Importing this package does not import torch."""
