"""The one pattern for user-chosen names (slide ids, encoders, attacks, MIL models, custom encoders).

Names become path components and Snakemake wildcards, so they start with a letter or digit and
hold only letters, digits, ``_``, ``.`` and ``-``. Used by the sample sheet, the encoder registry,
the config schema (``$defs/name``, filled on load) and the wildcard constraints.
"""

import re

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_NAME = re.compile(rf"^{NAME_PATTERN}$")


def is_valid_name(value: object) -> bool:
    return isinstance(value, str) and _NAME.match(value) is not None


# Reserved names of the backdoor branch's paths (rules/backdoor.smk): the clean head's trigger
# (nothing poisoned) and the shots setting "every training slide".
BACKDOOR_CLEAN_HEAD = "clean"
BACKDOOR_ALL_SHOTS = "all"
