"""The VAE a request names: a registered VAE resource, by id, AIR alias or unique name (what an A1111
infotext's `VAE:` says), usable by the caller for the checkpoint's family. No name: the checkpoint's own.

Refusals have codes of their own, so a client can tell a typo from a VAE it may not use:
`vae_not_found` (none the caller can see; `vae_ambiguous`: a name several share), `not_a_vae` (the name is another kind of resource),
`family_mismatch` (a VAE of the other family: SD1 and SDXL latents are scaled differently), and the
registry's `resource_disabled`.
"""

from __future__ import annotations

from genserve.resources.models import ModelFamily, ResourceKind
from genserve.resources.registry import (
    ResolvedResource,
    ResourceNotFound,
    ResourceRegistry,
    ResourceUnavailable,
)


def resolve_vae(registry: ResourceRegistry, ref: str, family: str, user_id: str | None) -> ResolvedResource:
    try:
        row = registry.visible(ref, user_id)
    except ResourceNotFound:
        # A1111 writes the VAE's file name; an upload's name is the file name without its extension
        names = {ref, ref.removesuffix(".safetensors")}
        named = [r for r in registry.list(kind=ResourceKind.vae, viewer=user_id) if r.name in names]
        if len(named) != 1:
            raise ResourceNotFound(f"no{' single' if named else ''} VAE {ref}", code="vae_ambiguous" if named else "vae_not_found",
                                   details={"vae": ref, **({"ids": [r.id for r in named]} if named else {})}) from None
        row = named[0]
    if ResourceKind(row.kind) is not ResourceKind.vae:
        raise ResourceUnavailable(f"{ref} is a {ResourceKind(row.kind).value}, not a VAE", code="not_a_vae",
                                  details={"vae": ref, "kind": ResourceKind(row.kind).value})
    if ModelFamily(row.family).value != family:
        raise ResourceUnavailable(f"{ref} is a {ModelFamily(row.family).value} VAE; the checkpoint is {family}",
                                  code="family_mismatch", details={"vae": ref, "id": row.id})
    # the one usability question the worker asks again (disabled since, visibility)
    return ResolvedResource.from_row(registry.usable(row.id, ResourceKind.vae, family, user_id))
