"""Wrap a finished highdicom content tree in an SR document without copying it twice.

highdicom's SR constructors deep-copy the content tree, parse the copy back into content
items and walk it again to check references: about 60 % of the build time of a one-image
report here, and growing with every referenced CT slice. The content we pass was just built
by highdicom's own templates and content items (already validated), and every image it
references is in ``evidence`` by construction (tests check both). So the document is built
by highdicom around a root-only stub, and the real root's attributes are then set on it
exactly as highdicom does (``for tag, value in content.items(): self[tag] = value``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from highdicom.sr import ContentSequence
from highdicom.sr.sop import _SR
from pydicom.dataset import Dataset

_ROOT_HEADER = (
    "ValueType",
    "ConceptNameCodeSequence",
    "ContinuityOfContent",
    "ContentTemplateSequence",
)


def sr_document(factory: Callable[..., _SR], content: ContentSequence, **kwargs: Any) -> _SR:
    """``factory(content=..., **kwargs)`` with ``content`` (a root ContentSequence) attached."""
    root = content[0]
    stub = Dataset()
    for keyword in _ROOT_HEADER:
        if keyword in root:
            stub[keyword] = root[keyword]
    stub.ContentSequence = []
    doc = factory(content=stub, **kwargs)
    for tag, value in root.items():
        doc[tag] = value
    doc._content = content  # what highdicom's from_dataset would rebuild, minus the copy
    return doc
