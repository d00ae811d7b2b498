"""Attacks in three separable parts: objectives (label-free), methods, budgets/selection.

``perturb.perturb_slide`` chains them for one slide and writes the attack store.
"""
