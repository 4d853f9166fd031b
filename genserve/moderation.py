"""Moderation: the admin routes' likeness blocklist entries, takedowns and known-abusive image hashes.

A takedown approved here blocklists the resources' files and the person's name, and turns the
resources off; every replica sees the blocklist and the names on its next check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from genserve.core.config.generation import InputImageLimits
from genserve.core.errors import InvalidRequest
from genserve.generation.inputs import base64_bytes, decode_image
from genserve.resources.cache import ResourceCache
from genserve.resources.models import ResourceKind
from genserve.resources.registry import ResolvedResource, ResourceRegistry
from safety.gate import SafetyGate
from safety.image_hash import parse_hash, perceptual_hash
from safety.takedowns import TakedownRecord, Takedowns


class Moderation:
    def __init__(self, registry: ResourceRegistry, resource_cache: ResourceCache, safety: SafetyGate):
        self.registry = registry
        self.resource_cache = resource_cache
        self.safety = safety
        self.takedowns = Takedowns(safety.session_factory, safety.blocklist, safety.audit)

    def _resource_file(self, resource_id: str) -> ResolvedResource:
        res = ResolvedResource.from_row(self.registry.get(resource_id))
        if res.format != "safetensors":
            raise InvalidRequest(f"{resource_id} is not a single safetensors file", code="not_a_file_resource")
        return res

    def add_likeness(self, resource_id: str, person: str, reason: str = "", source: str = "") -> int:
        """Blocklist a registered resource's file; copies of it (renamed, re-exported) match too."""
        res = self._resource_file(resource_id)
        blocklist = self.safety.blocklist
        with self.resource_cache.use(res.storage_key, res.sha256, "file") as path:
            # a checkpoint is fingerprinted as its difference from its family's registered base; with no base
            # registered it is blocklisted by its hashes alone (and the audit row says so)
            hash_only = res.kind is ResourceKind.checkpoint and not blocklist.has_base(res.family)
            entry_id = blocklist.add(path, person, reason, source=source or "admin-api", created_by="admin-api",
                                     resource_id=resource_id, family=res.family, hash_only=hash_only)
        self.safety.audit.append("likeness", "block", rules=["likeness.admin"], subject=res.sha256,
                                 details={"entry_id": entry_id, "resource_id": resource_id, "person": person,
                                          "reason": reason, "hash_only": hash_only})
        return entry_id

    def request_takedown(self, person: str, *, contact: str = "", resource_ids: Iterable[str] = (),
                         reason: str = "", requested_by: str = "") -> TakedownRecord:
        return self.takedowns.request(person, contact=contact, resource_ids=resource_ids, reason=reason,
                                      requested_by=requested_by)

    def approve_takedown(self, takedown_id: str, moderator: str, note: str = "") -> TakedownRecord:
        """Blocklist the takedown's resources and the person's name, and turn the resources off."""
        record = self.takedowns.get(takedown_id)
        with contextlib.ExitStack() as stack:
            files = {}
            for rid in record.resource_ids:
                res = self._resource_file(rid)
                files[rid] = stack.enter_context(self.resource_cache.use(res.storage_key, res.sha256, "file"))
            done = self.takedowns.approve(takedown_id, moderator, files, note)
        for rid in record.resource_ids:
            self.registry.disable(rid, f"takedown {takedown_id}")
        self.safety.refresh_person_names()
        return done

    def deny_takedown(self, takedown_id: str, moderator: str, note: str = "") -> TakedownRecord:
        return self.takedowns.deny(takedown_id, moderator, note)

    def add_image_hash(self, *, phash: str | None = None, image_base64: str | None = None, reason: str = "",
                       source: str = "", limits: InputImageLimits | None = None) -> dict:
        """Put a known-abusive image's perceptual hash on the input blocklist: given as its 16 hex digits,
        or computed here from the image (decoded under the input bounds, then forgotten: only the hash
        is kept). Audited."""
        if (phash is None) == (image_base64 is None):
            raise InvalidRequest("give either `phash` or `image`", code="image_hash_source")
        if image_base64 is not None:
            limits = limits or InputImageLimits()
            phash = perceptual_hash(decode_image(base64_bytes(image_base64, "image", limits), limits,
                                                 field="image").image)
        try:
            phash = parse_hash(phash or "")
        except ValueError as exc:
            raise InvalidRequest(str(exc), code="image_hash_invalid") from exc
        entry_id, added = self.safety.image_hashes.add(phash, reason=reason, source=source, created_by="admin-api")
        self.safety.audit.append("image_hash_add", "allow", rules=["input.hash_blocklisted"], subject=phash,
                                 details={"entry_id": entry_id, "added": added, "reason": reason, "source": source})
        return {"entry_id": entry_id, "phash": phash, "added": added}
