"""Data: DICOM writing (`dicomio`), series -> volume (`volume`), per-backbone preprocessing
(`preprocess`), training manifests (`manifest`) and synthetic phantoms (`synth`).

Submodules are imported lazily by their users so that, e.g., the DICOM receiver does not pay for
importing MONAI.
"""
