"""DICOM networking of the node: status codes, spool, C-STORE SCP, C-STORE/C-ECHO SCU."""
