"""``normlab reproduce``: claims of the normalization papers rerun as small studies.

``claims`` (each claim: arms as study cells, comparisons, direction; fixed in advance),
``tasks`` (the claims' own data and models behind the study's ``Task`` interface),
``verdict`` (the one rule), ``run`` (cells through the study runner and store; values read
back from the store), ``report`` (reproduce.md, reproduce.json, figures), ``command`` (CLI).
"""

from .claims import CLAIMS, Claim, claim_ids, get_claims
from .verdict import paired_stats, verdict

__all__ = ["CLAIMS", "Claim", "claim_ids", "get_claims", "paired_stats", "verdict"]
