"""The likeness blocklist: LoRAs and checkpoints that reproduce a real person are never loaded.

  fingerprint.py  per-module energy + sketch of a file's weight update (every adapter kind, checkpoints)
  containment.py  the share of a blocked entry's energy a candidate reproduces, for many entries at once
  blocklist.py    the entries in the database and the checks: one file, or a whole request combined
  request.py      one request's files, each prepared once per process, checked alone and together
"""

from safety.hashing import file_hashes
from safety.likeness.blocklist import (
    BlocklistEntry,
    LikenessBlocklist,
    LikenessConfig,
    LikenessMatch,
    PreparedResource,
    checkpoint_family,
)
from safety.likeness.containment import ContainmentIndex, containment
from safety.likeness.fingerprint import (
    DIM,
    FINGERPRINT_VERSION,
    SKETCH,
    Fingerprint,
    FingerprintError,
    fingerprint_checkpoint,
    fingerprint_lora,
    resource_kind,
)
from safety.likeness.request import RequestCheck, RequestFile

__all__ = [
    "DIM",
    "FINGERPRINT_VERSION",
    "SKETCH",
    "BlocklistEntry",
    "ContainmentIndex",
    "Fingerprint",
    "FingerprintError",
    "LikenessBlocklist",
    "LikenessConfig",
    "LikenessMatch",
    "PreparedResource",
    "RequestCheck",
    "RequestFile",
    "checkpoint_family",
    "containment",
    "file_hashes",
    "fingerprint_checkpoint",
    "fingerprint_lora",
    "resource_kind",
]
