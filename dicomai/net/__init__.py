"""The DICOM network edge: the C-ECHO/C-STORE listener and shared DIMSE helpers."""
