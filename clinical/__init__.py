"""Clinical formats around a label map: DICOM series in, DICOM-SEG and Slicer .seg.nrrd out, PACS over
DICOMweb, structure codes and colours, statistics, structure subsets and previews.

Plain modules that take and return numpy arrays and paths; none talks to Triton.
"""
