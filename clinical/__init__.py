"""Clinical formats: DICOM series in, DICOM-SEG out, PACS over DICOMweb, structure codes and colours."""
