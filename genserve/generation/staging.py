"""Images on their way into the object store while the worker still scans them.

Each finished image is put under a key that names its digest as soon as its PNG arrives, so no one
can ask for it before the finished job lists it. Settlement lists the ones it delivers (`take`);
whatever is still staged when a job ends is deleted (`discard`), so a withheld image, or one of a
failed job, never stays in the store.
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from genserve.core import metrics
from genserve.core.errors import GenserveError
from genserve.core.storage import ObjectStore
from genserve.engine.infotext import EXTENSIONS, MEDIA_TYPES, image_format
from genserve.generation.jobs import image_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedImage:
    key: str
    digest: str
    png: bytes
    stored: Future  # the put; settlement waits for it, `discard` before deleting


class ImageStaging:
    def __init__(self, store: ObjectStore, threads: int):
        self.store = store
        self._staged: dict[str, dict[int, StagedImage]] = {}  # job id -> image index -> staged image
        self._storing = ThreadPoolExecutor(threads, thread_name_prefix="genserve-store")

    def stage(self, user_id: str, job_id: str, family: str, index: int, png: bytes, digest: str) -> None:
        fmt = image_format(png)
        key = image_key(user_id, job_id, index, digest, EXTENSIONS[fmt])

        def put() -> None:
            with metrics.stage_timer("store", family):
                self.store.put_bytes(key, png, content_type=MEDIA_TYPES[fmt])

        self._staged.setdefault(job_id, {})[index] = StagedImage(key, digest, png, self._storing.submit(put))

    def staged(self, job_id: str) -> dict[int, StagedImage]:
        """The job's staged images (the live mapping: `take` removes from it)."""
        return self._staged.get(job_id, {})

    def take(self, job_id: str, index: int) -> StagedImage | None:
        """Hand an image over to the finished job: it is no longer deleted with the job's leftovers."""
        return self._staged.get(job_id, {}).pop(index, None)

    def has_leftovers(self, job_id: str) -> bool:
        return bool(self._staged.get(job_id))

    def discard(self, job_id: str, images: dict[int, StagedImage] | None = None) -> None:
        """Delete stored images no finished job lists: `images`, or all of `job_id`'s still staged."""
        staged = images if images is not None else self._staged.get(job_id, {})
        while staged:
            _, image = staged.popitem()
            with contextlib.suppress(Exception):  # a failed put stored nothing; delete regardless
                image.stored.result()  # a put still running would land after the delete
            try:
                self.store.delete(image.key)
            except GenserveError:
                logger.error("could not delete undelivered image %s", image.key)

    def delete_keys(self, keys: list[str]) -> None:
        """Delete objects of a job that are not images to deliver (its input image and mask)."""
        for key in keys:
            try:
                self.store.delete(key)
            except GenserveError:
                logger.error("could not delete %s", key)

    def forget(self, job_id: str) -> None:
        self._staged.pop(job_id, None)

    def close(self) -> None:
        self._storing.shutdown(wait=True)
