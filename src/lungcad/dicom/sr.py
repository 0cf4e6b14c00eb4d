"""Results back to the PACS, per series: a TID 1500 Measurement Report in a Comprehensive 3D SR (highdicom).

One SR per scored series, built from highdicom's TID 1500 classes as its documentation composes
them (observation context -> measurement group -> `MeasurementReport` -> `Comprehensive3DSR`):

    Measurement Report (TID 1500), observer: the lungcad device (name, version, model sha256)
      Imaging Measurements
        Measurement Group (TID 1501), finding type: malignant tumour of lung (the suspicion assessed)
          tracking identifier, algorithm identification (name, version; parameters: model sha256,
            operating threshold), source images: the key slices the series result rests on
          Measurement "Probability of cancer" = the calibrated p(malignant) of the series
          Measurement "Operating threshold" = the malignant threshold of the decision rule
          Qualitative evaluation "Decision at the operating threshold" = malignant / not malignant
          Qualitative evaluation "Out of distribution" = Yes / No
      Qualitative Evaluations (TID 1500 row 12): "decision support, not a diagnosis" (TEXT)

The decision and the threshold use a local coding scheme (99LUNGCAD: DICOM has no standard code
for a model's operating point); everything else is DCM or SNOMED CT. UIDs derive from the source
series and the model sha256, so a rerun rewrites the same object. An amended report (the DICOM node
re-scoring a series after late instances) is a new instance in the same SR series: `info["amendment"]`
(a digest of the instances it was computed from) makes its SOP Instance UID distinct, its Instance
Number is `info["revision"]` + 1, and the report it supersedes, when known (`info["predecessor"]`),
is referenced in the Predecessor Documents Sequence (PS3.3 C.17.2). `read_series_probability` reads
the probability back with highdicom's TID 1500 parser (what a downstream consumer would do).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lungcad
from lungcad.dicom.deid import hashed_uid
from lungcad.dicom.writer import multiframe_class
from lungcad.errors import LungcadError, first_line
from lungcad.inference.results import Prediction
from lungcad.utils import atomic_path

__all__ = [
    "SR_SERIES_NUMBER", "build_series_report", "read_series_probability", "report_uids", "write_series_report",
]

logging.getLogger("highdicom").setLevel(logging.WARNING)  # one INFO line per copied module otherwise

SR_SERIES_NUMBER = 9901  # next to the Secondary Capture series (9900)
DISCLAIMER = "lungcad decision support, not a diagnosis: to be read by a clinician with the full study"
ALGORITHM = "lungcad ResNet-50 lung CT classifier"
_LOCAL = "99LUNGCAD"  # private coding scheme (PS3.16 8.2: designators starting with 99 are local)


def _hd():
    try:
        import highdicom as hd
        import pydicom
    except ImportError:
        raise LungcadError("DICOM results need highdicom: pip install 'lungcad[dicom]'") from None
    return hd, pydicom


def _codes():
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    return {
        "procedure": codes.LN.CTChestReport,  # LOINC 24627-2
        "finding": Code("363358000", "SCT", "Malignant tumor of lung"),
        "probability": codes.DCM.ProbabilityOfCancer,  # DCM 111047
        "threshold": Code("threshold", _LOCAL, "Operating threshold of p(malignant)"),
        "decision": Code("decision", _LOCAL, "Decision at the operating threshold"),
        "malignant": Code("malignant", _LOCAL, "Malignant at the operating threshold"),
        "not malignant": Code("not-malignant", _LOCAL, "Not malignant at the operating threshold"),
        "ood": Code("ood", _LOCAL, "Out of distribution of the training images"),
        "yes": codes.SCT.Yes,
        "no": codes.SCT.No,
        "unitless": Code("1", "UCUM", "no units"),
        "qualitative": Code("C0034375", "UMLS", "Qualitative Evaluations"),
        "comment": codes.DCM.Comment,
    }


def report_uids(series_uid: str, model_sha256: str, amendment: str = "") -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the SR for a source series: stable per series and model.

    An amended report keeps the series and gets its own instance UID (a PACS ignores or rejects a
    known UID with new content), stable per `amendment` so that a retried write gives the same object.
    """
    key = model_sha256 or "lungcad"
    sop = f"sr:{series_uid}:{amendment}" if amendment else f"sr:{series_uid}"
    return hashed_uid(key, f"sr-series:{series_uid}"), hashed_uid(key, sop)


def _predecessor(study_uid: str, sr_series: str, sop_uid: str):
    """The minimal header highdicom needs to reference a superseded report (Predecessor Documents Sequence)."""
    from pydicom import Dataset
    from pydicom.uid import Comprehensive3DSRStorage

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = Comprehensive3DSRStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, sr_series
    return ds


def build_series_report(series_pred: Prediction, key_images: list[tuple], info: dict):
    """The Comprehensive 3D SR of one series result.

    `key_images`: (pydicom header, frame index or None) of the key slices, most malignant first;
    the first one's patient and study are the SR's. `info`: model_sha256, threshold (None = argmax);
    for an amended report also amendment, revision and predecessor (module docstring).
    """
    hd, pydicom = _hd()
    if not key_images:
        raise LungcadError("a series report needs at least one key image")
    c = _codes()
    sha = info.get("model_sha256") or series_pred.model_sha256 or ""
    threshold = info.get("threshold")
    series_uid = str(key_images[0][0].SeriesInstanceUID)
    sr_series, sr_sop = report_uids(series_uid, sha, info.get("amendment", ""))
    predecessor = info.get("predecessor")
    previous = [_predecessor(str(key_images[0][0].StudyInstanceUID), sr_series, predecessor)] if predecessor else None
    parameters = [f"model sha256 {sha}",
                  f"malignant threshold {threshold:.4f}" if threshold is not None else "decision: argmax"]
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM, version=lungcad.__version__, parameters=parameters)
    device = hd.sr.ObserverContext(
        observer_type=pydicom.sr.codedict.codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hashed_uid(sha or "lungcad", "device"), name="lungcad", manufacturer_name="lungcad",
            model_name=f"lungcad {lungcad.__version__}"[:64],
        ),
    )
    measurements = [
        hd.sr.Measurement(name=c["probability"], value=float(series_pred.malignant_probability), unit=c["unitless"],
                          algorithm_id=algorithm),
    ]
    if threshold is not None:
        measurements.append(hd.sr.Measurement(name=c["threshold"], value=float(threshold), unit=c["unitless"]))
    evaluations = [
        hd.sr.QualitativeEvaluation(name=c["decision"], value=c[series_pred.decision]),
        hd.sr.QualitativeEvaluation(name=c["ood"], value=c["yes" if series_pred.ood else "no"]),
    ]
    sources, seen = [], set()
    for ds, frame in key_images:
        frames = [int(frame) + 1] if frame is not None and multiframe_class(ds) else None
        if (str(ds.SOPInstanceUID), None if frames is None else frames[0]) in seen:
            continue  # key frames of one single-frame-class file: one reference to the whole file
        seen.add((str(ds.SOPInstanceUID), None if frames is None else frames[0]))
        sources.append(hd.sr.SourceImageForMeasurementGroup.from_source_image(ds, referenced_frame_numbers=frames))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hashed_uid(sha or "lungcad", f"track:{series_uid}"),
                                                     identifier="lungcad series result"),
        finding_type=c["finding"], algorithm_id=algorithm, measurements=measurements,
        qualitative_evaluations=evaluations, source_images=sources,
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=c["procedure"], imaging_measurements=[group],
    )
    # TID 1500 row 12: report-level Qualitative Evaluations, here the decision-support statement as TEXT.
    statement = hd.sr.ContainerContentItem(name=c["qualitative"], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    statement.ContentSequence = hd.sr.ContentSequence([hd.sr.TextContentItem(
        name=c["comment"], value=DISCLAIMER, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)])
    report[0].ContentSequence.append(statement)
    evidence = _unique([ds for ds, _ in key_images])
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=sr_series, series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sr_sop, instance_number=1 + int(info.get("revision", 0)), manufacturer="lungcad",
        is_complete=True, is_final=False, is_verified=False, previous_versions=previous,
    )
    scheme = pydicom.Dataset()  # declare the local coding scheme (PS3.3 C.12.1.1.2.1)
    scheme.CodingSchemeDesignator = _LOCAL
    scheme.CodingSchemeName = "lungcad local codes"
    scheme.CodingSchemeResponsibleOrganization = "lungcad"
    sr.CodingSchemeIdentificationSequence = [scheme]
    sr.SeriesDescription = "lungcad result, decision support, not a diagnosis"[:64]
    sr.ManufacturerModelName = "lungcad"
    sr.SoftwareVersions = lungcad.__version__
    return sr


def _unique(datasets: list) -> list:
    seen, out = set(), []
    for ds in datasets:
        if str(ds.SOPInstanceUID) not in seen:
            seen.add(str(ds.SOPInstanceUID))
            out.append(ds)
    return out


def write_series_report(series_pred: Prediction, slices: list[Prediction], key_slices: list[Prediction],
                        out_dir: str | Path, info: dict) -> Path:
    """Write the SR of a series whose slice predictions came from DICOM files (`Prediction.source`)."""
    _, pydicom = _hd()
    key_images = []
    for pred in key_slices:
        path = pred.source.split("#")[0]
        try:
            key_images.append((pydicom.dcmread(path, stop_before_pixels=True), pred.dicom.get("frame")))
        except Exception as exc:
            raise LungcadError(f"cannot re-read the DICOM header ({first_line(exc, 120)})", path) from None
    sr = build_series_report(series_pred, key_images, info)
    # an amended report gets its own file: the one it supersedes may still wait in the outbound queue
    amended = f"_{info['amendment'][:12]}" if info.get("amendment") else ""
    out = Path(out_dir) / f"{series_pred.dicom.get('SeriesInstanceUID', sr.SeriesInstanceUID)}_lungcad_sr{amended}.dcm"
    with atomic_path(out) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return out


def read_series_probability(path_or_dataset) -> float:
    """The calibrated p(malignant) of a lungcad SR, read back through highdicom's TID 1500 parser."""
    hd, pydicom = _hd()
    ds = path_or_dataset if isinstance(path_or_dataset, pydicom.Dataset) else pydicom.dcmread(path_or_dataset)
    report = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    for group in report.get_image_measurement_groups():
        for m in group.get_measurements(name=_codes()["probability"]):
            return float(m.value)
    raise LungcadError("no probability of cancer in this SR")
