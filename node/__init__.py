"""node: the DICOM service — receiver, assembler, worker, report, dispatcher."""
