"""wsiattack: measure the adversarial robustness of pathology foundation models on WSIs.

The library behind the Snakemake workflow: each rule's thin script in ``workflow_scripts/``
calls one function of this package.
"""

__version__ = "0.1.0"
