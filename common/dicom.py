"""DICOM facts both the node and the volume reader rely on: the CT storage classes, the plausible
geometry of a CT image, and where an Enhanced CT attribute is found (functional groups)."""

from __future__ import annotations

from typing import Any

from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)

#: multi-frame CT: geometry and rescale live in the functional groups
MULTIFRAME_CT_CLASSES: tuple[UID, ...] = (
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)
#: the CT storage classes the node receives and the volume reader reads; any other is ignored
CT_STORAGE_CLASSES: tuple[UID, ...] = (CTImageStorage, *MULTIFRAME_CT_CLASSES)

#: What a CT scanner can produce; a header outside these is corrupt or hostile, and resampling
#: it would turn megabytes of input into gigabytes of volume.
PIXEL_SPACING_MM = (0.01, 10.0)
MAX_FIELD_OF_VIEW_MM = 1000.0


def first_item(ds: Any, keyword: str) -> Any:
    """The first item of sequence `keyword` in `ds` (None if `ds` is None, or it is absent or
    empty)."""
    if ds is None or keyword not in ds:
        return None
    value = ds[keyword].value
    return value[0] if value else None


def functional_group_value(ds: Any, frame_item: Any, sequence: str, keyword: str) -> Any:
    """`keyword` of an Enhanced CT frame: from `sequence` (a functional-group macro, e.g.
    ``PixelMeasuresSequence``) in the frame's item of PerFrameFunctionalGroupsSequence, else in
    SharedFunctionalGroupsSequence, else the top-level attribute; None where none has it.

    Per-frame first: a macro should be in one of the two, and where a writer puts it in both
    the frame's own value is the more specific (PS3.3 C.7.6.16). `frame_item` may be None (a
    header-level question: pass the first frame's item)."""
    for holder in (frame_item, first_item(ds, "SharedFunctionalGroupsSequence")):
        item = first_item(holder, sequence)
        if item is not None and keyword in item:
            return item[keyword].value
    return ds.get(keyword) if ds is not None else None


__all__ = [
    "CT_STORAGE_CLASSES",
    "MAX_FIELD_OF_VIEW_MM",
    "MULTIFRAME_CT_CLASSES",
    "PIXEL_SPACING_MM",
    "first_item",
    "functional_group_value",
]
