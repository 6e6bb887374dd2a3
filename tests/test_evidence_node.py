"""Evidence images against the real node (issue 17 part 4): a phantom with a planted bleed sent to
`molre-node serve` on the packaged demo checkpoint (the default) (phantom-3d) with `[report] evidence = true`
comes back with key images whose slices contain the planted lesion (the generator's exact mask),
whose overlay peaks on it, that dciodvfy accepts and that the SR links from the finding; a normal
phantom gets no evidence images."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from molre.data.synth import write_phantom_series
from tests.nodeproc import NodeProcess, StorageSCP, dciodvfy_errors, sr_for, sr_presence, wait_until

KEY = "intraparenchymal_hemorrhage"
#: as `molre-node synth --findings intraparenchymal_hemorrhage --seed 2 --sites metro` draws it
#: (tests/test_demo_node.py: reported Present by the demo checkpoint)
ICH_SEED, NORMAL_SEED = 2, 12
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed")
def test_key_images_of_a_planted_bleed_show_the_lesion(tmp_path: Path) -> None:
    ich = write_phantom_series(
        tmp_path / "ich", np.random.default_rng(ICH_SEED), [KEY], size=None, site="metro"
    )
    normal = write_phantom_series(
        tmp_path / "normal", np.random.default_rng(NORMAL_SEED), [], size=None, site="valley"
    )
    mask = ich.masks[KEY]  # (z, y, x): slice z is file ich.paths[z]
    slice_of = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): z
        for z, p in enumerate(ich.paths)
    }
    with StorageSCP("RESULTS") as scp:
        node = NodeProcess.create(
            tmp_path / "node",
            destinations=[scp.destination()],
            report={"evidence": True, "evidence_key_images": 3},
        )
        with node:
            for info in (ich, normal):
                assert node.send(info.paths).ok
            sr = sr_for(scp, ich.series_uid, node)
            clean = sr_for(scp, normal.series_uid, node)
            found = sr_presence(sr, tmp_path)
            assert found[KEY][1], found
            group = [
                g
                for g in hd.sr.srread(
                    tmp_path / f"{sr.SOPInstanceUID}.dcm"
                ).content.get_image_measurement_groups()
                if g.tracking_identifier == KEY
            ][0]
            shown = [
                i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                for i in group[0].ContentSequence
                if i.ValueType == "IMAGE" and i.ConceptNameCodeSequence[0].CodeValue == "121200"
            ]
            assert 1 <= len(shown) <= 3
            by_uid = wait_until(
                lambda: (lambda d: d if set(shown) <= set(d) else None)(
                    {str(d.SOPInstanceUID): d for d in list(scp.received)}
                ),
                60,
                what="evidence images at the destination",
            )
            timeline = node.store().timeline(ich.series_uid)
    scs = [by_uid[u] for u in shown]
    sources = {s.referenced_sop_instance_uid for s in group.source_images}
    for sc in scs:
        src = str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert src in sources and sc.SOPClassUID == SC_CLASS and sc.SeriesNumber == 9903
        z = slice_of[src]
        # the highlighted slice contains the planted lesion ...
        assert mask[z].any(), (z, np.nonzero(mask.any(axis=(1, 2)))[0])
        # ... and the overlay is strongest on it (within 2 px of a lesion voxel)
        px = sc.pixel_array.astype(int)
        factor = sc.Columns // mask.shape[2]
        body = px[sc.Rows - mask.shape[1] * factor :]
        redness = body[..., 0] - body[..., 2]
        r, c = np.unravel_index(int(np.argmax(redness)), redness.shape)
        lesion = np.argwhere(mask[z])
        dist = np.min(np.hypot(lesion[:, 0] - r // factor, lesion[:, 1] - c // factor))
        assert dist <= 2.0, (z, (r // factor, c // factor), dist)
    # every object the node sent for the bleed is valid DICOM
    for n, ds in enumerate([sr, *scs]):
        path = tmp_path / f"sent{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], path
    # nothing Present on the normal phantom: no key images for its study
    assert not any(
        d.SOPClassUID == SC_CLASS and d.StudyInstanceUID == clean.StudyInstanceUID
        for d in scp.received
    )
    # key images were written for exactly the findings the SR calls Present (the planted one
    # among them; the demo also calls a bleed next to it, e.g. intraventricular, at times)
    written = [e for e in timeline if e["kind"] == "evidence_written"]
    present = sorted(k for k, (_p, yes) in found.items() if yes)
    assert len(written) == 1 and set(shown) <= set(written[0]["details"]["sop_instance_uids"])
    assert sorted(written[0]["details"]["findings"]) == present and KEY in present
