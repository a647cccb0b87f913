"""The DICOM node's router (issue 18, item 1): Orthanc receives C-STORE, the router selects series by the
site's rules (router.rules), segments them through Triton, stores the results back in Orthanc and forwards
them to a PACS, with a durable state (router.state). `python -m router --help`; docs/hospital-flow.md."""
