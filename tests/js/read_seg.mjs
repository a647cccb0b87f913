// Read a DICOM-SEG as OHIF does, with dcmjs (parsing) or @cornerstonejs/adapters (the label map on the CT's
// slices), for tests/test_clinical_seg_readers.py. Run with node in the folder where `npm ci` installed this
// folder's package-lock.json:
//
//   node read_seg.mjs dcmjs SEG.dcm OUT.json
//   node read_seg.mjs cornerstone SEG.dcm OUT.json CT_SLICE.dcm ...
//   node read_seg.mjs cornerstone-counts SEG.dcm OUT.json CT_SLICE.dcm ...
//
// OUT.json, dcmjs: the SEG's SOP class, segmentation type, transfer syntax, number of frames, its segments
// (number, label, category/type/modifier as [scheme, value, meaning]) and each frame's referenced segment.
// cornerstone: `createFromDICOMSegBuffer` (what OHIF's SEG loader calls) given the CT slices as its referenced
// images (metadata read from their files with dcmjs): `segments` {number: label}, `slices` (the CT SOP
// Instance UIDs in slice order), `shape` [slices, rows, columns] and `labelmap`, base64 of the uint16 segment
// numbers in that order; cornerstone-counts: `counts` {number: voxels} instead of the label map (for large
// SEGs: perf/dicom_seg_benchmark.py). A reader's refusal: {"error": "..."} and exit status 1.
import { readFileSync, writeFileSync } from 'node:fs';
import dcmjs from 'dcmjs';

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

function readDataset(path) {
  const bytes = readFileSync(path);
  const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  const file = DicomMessage.readFile(buffer);
  const dataset = DicomMetaDictionary.naturalizeDataset(file.dict);
  dataset._meta = DicomMetaDictionary.namifyDataset(file.meta);
  return { buffer, dataset };
}

const asArray = (value) => (value === undefined ? [] : Array.isArray(value) ? value : [value]);
const code = (item) => {
  const first = asArray(item)[0];
  return first ? [first.CodingSchemeDesignator, String(first.CodeValue), first.CodeMeaning] : null;
};

function describeWithDcmjs(dataset) {
  const segments = asArray(dataset.SegmentSequence).map((s) => {
    const type = asArray(s.SegmentedPropertyTypeCodeSequence)[0];
    return {
      number: s.SegmentNumber,
      label: s.SegmentLabel,
      category: code(s.SegmentedPropertyCategoryCodeSequence),
      type: code(type),
      modifier: type ? code(type.SegmentedPropertyTypeModifierCodeSequence) : null,
    };
  });
  const shared = asArray(dataset.SharedFunctionalGroupsSequence)[0] || {};
  const frames = asArray(dataset.PerFrameFunctionalGroupsSequence).map((group) => {
    const identification = asArray(group.SegmentIdentificationSequence || shared.SegmentIdentificationSequence)[0];
    return identification ? identification.ReferencedSegmentNumber : null;
  });
  return {
    sopClassUID: dataset.SOPClassUID,
    segmentationType: dataset.SegmentationType,
    transferSyntaxUID: dataset._meta.TransferSyntaxUID.Value[0],
    numberOfFrames: Number(dataset.NumberOfFrames),
    segments,
    frames,
  };
}

// A metadata provider holding what OHIF's would for each CT slice (read from its file) and the SEG instance.
class Metadata {
  constructor() {
    this.modules = new Map();
  }
  add(imageId, type, value) {
    this.modules.set(`${type}|${imageId}`, value);
  }
  get(type, imageId) {
    return this.modules.get(`${type}|${imageId}`);
  }
  addSlice(imageId, ds) {
    const iop = ds.ImageOrientationPatient.map(Number);
    const spacing = ds.PixelSpacing.map(Number);
    this.add(imageId, 'instance', ds);
    this.add(imageId, 'generalImageModule', { sopInstanceUID: ds.SOPInstanceUID, instanceNumber: ds.InstanceNumber });
    this.add(imageId, 'generalSeriesModule', { seriesInstanceUID: ds.SeriesInstanceUID, modality: ds.Modality });
    this.add(imageId, 'imagePixelModule', {
      bitsAllocated: ds.BitsAllocated, bitsStored: ds.BitsStored, highBit: ds.HighBit,
      pixelRepresentation: ds.PixelRepresentation, samplesPerPixel: ds.SamplesPerPixel,
      photometricInterpretation: ds.PhotometricInterpretation, rows: ds.Rows, columns: ds.Columns,
    });
    this.add(imageId, 'imagePlaneModule', {
      frameOfReferenceUID: ds.FrameOfReferenceUID, rows: ds.Rows, columns: ds.Columns,
      imageOrientationPatient: iop, rowCosines: iop.slice(0, 3), columnCosines: iop.slice(3),
      imagePositionPatient: ds.ImagePositionPatient.map(Number), sliceThickness: Number(ds.SliceThickness),
      pixelSpacing: spacing, rowPixelSpacing: spacing[0], columnPixelSpacing: spacing[1],
    });
  }
}

async function readWithCornerstone(segBuffer, ctPaths, countsOnly = false) {
  const core = await import('@cornerstonejs/core');
  const { adaptersSEG } = await import('@cornerstonejs/adapters');
  const metadata = new Metadata();
  core.metaData.addProvider((type, imageId) => metadata.get(type, imageId), 10000);
  const slices = ctPaths.map((path) => readDataset(path).dataset);
  const iop = slices[0].ImageOrientationPatient.map(Number);
  const normal = [
    iop[1] * iop[5] - iop[2] * iop[4], iop[2] * iop[3] - iop[0] * iop[5], iop[0] * iop[4] - iop[1] * iop[3]];
  const along = (ds) => ds.ImagePositionPatient.map(Number).reduce((sum, x, i) => sum + x * normal[i], 0);
  slices.sort((a, b) => along(a) - along(b));
  const imageIds = slices.map((ds) => `ct:${ds.SOPInstanceUID}`);
  slices.forEach((ds, i) => metadata.addSlice(imageIds[i], ds));
  const result = await adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(
    imageIds, segBuffer, { metadataProvider: metadata, tolerance: 1e-3 });
  const { Rows: rows, Columns: columns } = slices[0];
  const labelmap = new Uint16Array(slices.length * rows * columns);
  result.labelMapImages[0].forEach((image, i) => {
    const index = imageIds.indexOf(image.referencedImageId);
    const pixels = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
    labelmap.set(pixels, index * rows * columns);
  });
  const segments = {};
  result.segMetadata.data.forEach((segment, number) => {
    if (segment) segments[number] = segment.SegmentLabel;
  });
  if (countsOnly) {
    const counts = {};
    for (const value of labelmap) if (value) counts[value] = (counts[value] || 0) + 1;
    return { segments, counts };
  }
  return {
    segments,
    overlapping: Boolean(result.overlappingSegments),
    slices: slices.map((ds) => ds.SOPInstanceUID),
    shape: [slices.length, rows, columns],
    labelmap: Buffer.from(labelmap.buffer).toString('base64'),
  };
}

async function main([reader, segPath, outPath, ...ctPaths]) {
  let output;
  let status = 0;
  try {
    const { buffer, dataset } = readDataset(segPath);
    if (reader === 'dcmjs') output = describeWithDcmjs(dataset);
    else if (reader === 'cornerstone') output = await readWithCornerstone(buffer, ctPaths);
    else if (reader === 'cornerstone-counts') output = await readWithCornerstone(buffer, ctPaths, true);
    else throw new Error(`unknown reader ${reader}: use dcmjs, cornerstone or cornerstone-counts`);
  } catch (error) {
    output = { error: String(error && error.message ? error.message : error).split('\n')[0] };
    status = 1;
  }
  writeFileSync(outPath, JSON.stringify(output));
  process.exit(status);
}

main(process.argv.slice(2));
