"""Defences applied at evaluation time, and the attacker's view of them (issue #17's library core).

- :mod:`~wsiattack.defences.transforms`: tile input transforms (JPEG, bit depth, Gaussian and
  median smoothing, Reinhard stain normalisation, Gaussian noise) and ``DefendedEncoder``, the
  encoder an adaptive attacker differentiates: straight-through (BPDA) for the non-differentiable
  steps, expectation over transformation (EOT) for the randomised one.
- :mod:`~wsiattack.defences.aggregation`: robust MIL aggregation as heads with the MIL interface
  (``DropTopAttended``, ``FilteredHead``), so the gray-box oracle attacks through them unchanged.
- :mod:`~wsiattack.defences.detection`: the in-slide k-nearest-neighbour outlier score of a
  tile's embedding, its threshold at a matched false-positive rate, the detector's ROC, and the
  detection-aware objective of the adaptive attacker.
"""
