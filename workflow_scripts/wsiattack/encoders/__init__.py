"""Tile encoders: a torch-free registry of named specs and the weights preflight (``registry``),
weights from local checkpoints or the Hugging Face Hub (``weights``), and the model wrapper that
owns resizing and normalisation (``model``). Importing this package does not import torch."""
