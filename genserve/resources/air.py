"""AIR resource names (`urn:air:<ecosystem>:<type>:<source>:<id>[@<version>]`), as a model-sharing site
names resources, accepted as aliases of registry ids.

Ecosystems of the same architecture map to one family (Pony, Illustrious and NoobAI are SDXL models);
types map to the registry's kinds (a LyCORIS or DoRA file is a `lora`). The alias is stored in its
canonical form (lower-case ecosystem, type and source; the family's own ecosystem name), so the site
may send `urn:air:pony:lycoris:civitai:1@2` for what was registered as `urn:air:sdxl:lora:civitai:1@2`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from genserve.core.errors import InvalidRequest
from genserve.resources.models import ResourceKind

PREFIX = "urn:air:"
_AIR = re.compile(
    r"^urn:air:(?P<ecosystem>[a-z0-9_.-]{1,32}):(?P<type>[a-z0-9_-]{1,32}):(?P<source>[a-z0-9_-]{1,32}):"
    r"(?P<id>[A-Za-z0-9_.-]{1,64})(?:@(?P<version>[A-Za-z0-9_-]{1,64}))?$",
    re.IGNORECASE,
)
ECOSYSTEMS = {
    "sd1": "sd1", "sd15": "sd1", "sd1.5": "sd1",
    "sdxl": "sdxl", "sdxl1": "sdxl", "pony": "sdxl", "illustrious": "sdxl", "noobai": "sdxl",
}
TYPES = {
    "checkpoint": ResourceKind.checkpoint, "model": ResourceKind.checkpoint,
    "lora": ResourceKind.lora, "lycoris": ResourceKind.lora, "locon": ResourceKind.lora, "dora": ResourceKind.lora,
    "embedding": ResourceKind.embedding, "textualinversion": ResourceKind.embedding, "ti": ResourceKind.embedding,
    "vae": ResourceKind.vae,
}


class AirInvalid(InvalidRequest):
    code = "air_invalid"


@dataclass(frozen=True)
class Air:
    family: str
    kind: ResourceKind
    source: str
    id: str
    version: str | None = None

    def __str__(self) -> str:
        tail = f"@{self.version}" if self.version else ""
        return f"{PREFIX}{self.family}:{self.kind.value}:{self.source}:{self.id}{tail}"


def is_air(value: str) -> bool:
    return value[: len(PREFIX)].lower() == PREFIX


def parse_air(value: str) -> Air:
    """The canonical AIR of `value`; raises AirInvalid for malformed names and unknown ecosystems or types."""
    m = _AIR.match(value.strip())
    if m is None:
        raise AirInvalid(f"not an AIR (urn:air:<ecosystem>:<type>:<source>:<id>@<version>): {value!r}",
                         details={"air": value})
    family = ECOSYSTEMS.get(m["ecosystem"].lower())
    kind = TYPES.get(m["type"].lower())
    if family is None:
        raise AirInvalid(f"AIR ecosystem {m['ecosystem']!r} is not served here", details={"air": value})
    if kind is None:
        raise AirInvalid(f"AIR type {m['type']!r} is not a checkpoint, LoRA, embedding or VAE", details={"air": value})
    return Air(family, kind, m["source"].lower(), m["id"], m["version"])


def canonical_air(value: str) -> str:
    return str(parse_air(value))
