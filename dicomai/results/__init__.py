"""The DICOM objects returned to the PACS (Secondary Capture, Structured Report) and their publishing."""
