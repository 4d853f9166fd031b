"""Pipeline views: other pipeline classes over a loaded pipeline's components (`from_pipe`, no weight
copies), made once per loaded pipeline and kept while it lives. A view is used by one request at a
time (the caller holds the checkpoint's lock) and its scheduler is the caller's to set per image."""

from __future__ import annotations

import threading
import weakref

from diffusers import DiffusionPipeline

_views_lock = threading.Lock()
_views: weakref.WeakKeyDictionary[DiffusionPipeline, dict[type, DiffusionPipeline]] = weakref.WeakKeyDictionary()


def pipeline_view(pipe: DiffusionPipeline, cls: type[DiffusionPipeline]) -> DiffusionPipeline:
    """A `cls` pipeline over `pipe`'s components, made on first use and kept while `pipe` lives:
    `from_pipe` costs more than the rest of a small image's setup. The view's scheduler is the
    caller's to set per image; views are never shared by two requests at once (the checkpoint lock)."""
    with _views_lock:
        views = _views.setdefault(pipe, {})
        view = views.get(cls)
        if view is None:
            view = views[cls] = cls.from_pipe(pipe)
            view.set_progress_bar_config(disable=True)
        return view


def pipeline_views(pipe: DiffusionPipeline) -> list[DiffusionPipeline]:
    """The views made over `pipe` so far (a component swapped on `pipe` must be swapped on them too)."""
    with _views_lock:
        return list(_views.get(pipe, {}).values())


def drop_pipeline_views(pipe: DiffusionPipeline) -> None:
    """Forget `pipe`'s views now (a checkpoint being unloaded), so they hold none of its modules."""
    with _views_lock:
        _views.pop(pipe, None)
