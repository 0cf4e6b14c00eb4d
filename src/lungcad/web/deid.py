"""DICOM de-identification before storage: the PS3.15 Annex E basic application-level profile.

Attributes that identify the patient, the staff, the institution or the device are removed or
emptied, dates kept out, private tags and overlays removed, and every UID replaced by a keyed hash
(`2.25.<int>`), so slices of one study still share one (new) study UID. Pixel data is kept: text
burned into the pixels cannot be removed here, and `BurnedInAnnotation` is reported to the caller.
"""

from __future__ import annotations

import hashlib
import hmac
import io

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from lungcad.errors import LungcadError

# Replaced by a value of the same meaning but no identity (PS3.15 action D / Z).
REPLACE = {
    "PatientName": "ANONYMOUS",
    "PatientID": "",  # filled with a keyed hash below
    "PatientBirthDate": "",
    "PatientSex": "",
    "StudyDate": "",
    "StudyTime": "",
    "AccessionNumber": "",
    "ReferringPhysicianName": "",
    "StudyID": "",
    "ContentDate": "",
    "ContentTime": "",
}
# Removed outright (action X and the X/Z/D choices of the basic profile).
REMOVE = (
    "PatientAddress", "PatientTelephoneNumbers", "PatientBirthTime", "PatientBirthName", "PatientMotherBirthName",
    "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "PatientAge", "PatientSize", "PatientWeight",
    "MilitaryRank", "BranchOfService", "EthnicGroup", "Occupation", "AdditionalPatientHistory", "PatientComments",
    "PatientReligiousPreference", "MedicalRecordLocator", "MedicalAlerts", "Allergies", "PregnancyStatus",
    "SmokingStatus", "LastMenstrualDate", "CountryOfResidence", "RegionOfResidence", "PatientInsurancePlanCodeSequence",
    "ResponsiblePerson", "ResponsibleOrganization", "PatientState", "InsurancePlanIdentification",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "StationName", "DeviceSerialNumber", "PlateID", "DetectorID", "GantryID", "CassetteID",
    "PerformingPhysicianName", "PerformingPhysicianIdentificationSequence", "OperatorsName",
    "OperatorIdentificationSequence", "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence", "RequestingPhysician",
    "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "ReferringPhysicianIdentificationSequence",
    "ScheduledPerformingPhysicianName", "RequestingService", "RequestAttributesSequence",
    "StudyDescription", "SeriesDescription", "ProtocolName", "ImageComments", "AdmittingDiagnosesDescription",
    "DerivationDescription", "RequestedProcedureDescription", "PerformedProcedureStepDescription",
    "PerformedProcedureStepID", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "ScheduledProcedureStepDescription", "ReasonForStudy", "ReasonForTheRequestedProcedure",
    "AdmissionID", "IssuerOfAdmissionID", "IssuerOfPatientID", "ServiceEpisodeID", "VisitComments",
    "CurrentPatientLocation", "PatientInstitutionResidence", "Arbitrary", "TextComments", "TextString",
    "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime",
    "InstanceCreationDate", "InstanceCreationTime", "OverlayDate", "OverlayTime", "CurveDate", "CurveTime",
    "ReferencedPatientSequence", "ReferencedStudySequence", "ReferencedPerformedProcedureStepSequence",
    "DataSetTrailingPadding", "DigitalSignaturesSequence", "OriginalAttributesSequence",
    "ContributingEquipmentSequence", "ModifiedAttributesSequence", "SourceImageSequence",
)


def hashed_uid(secret: str, uid: str) -> str:
    """A valid UID (`2.25.<decimal>`, at most 64 chars) derived from `uid` with a site secret."""
    digest = hmac.new(secret.encode(), uid.encode(), hashlib.sha256).digest()[:16]  # 128 bits fit 2.25.
    return "2.25." + str(int.from_bytes(digest, "big"))


def _scrub(ds: Dataset, secret: str) -> None:
    ds.remove_private_tags()
    for elem in list(ds):
        group = elem.tag.group
        if 0x6000 <= group <= 0x60FF or 0x5000 <= group <= 0x50FF:  # overlays and curves may hold text
            del ds[elem.tag]
        elif elem.VR == "UI" and elem.value and elem.keyword not in ("SOPClassUID", "TransferSyntaxUID") \
                and not elem.keyword.endswith("ClassUID"):
            elem.value = [hashed_uid(secret, str(v)) for v in elem.value] if elem.VM > 1 else hashed_uid(secret, str(elem.value))
        elif elem.VR == "PN" and elem.keyword != "PatientName":
            elem.value = ""
        elif elem.VR == "SQ":
            for item in elem.value:
                _scrub(item, secret)
    for keyword in REMOVE:
        if keyword in ds:
            delattr(ds, keyword)
    for keyword, value in REPLACE.items():
        if keyword in ds:
            setattr(ds, keyword, value)


def deidentify(raw: bytes, secret: str, name: str = "<upload>") -> tuple[bytes, dict]:
    """De-identified DICOM bytes and a PHI-free summary (hashed study/series UIDs, modality, flags)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(raw), force=False)
    except (InvalidDicomError, EOFError, ValueError, OSError) as exc:
        raise LungcadError(f"not a readable DICOM file ({str(exc).splitlines()[0][:120]})", name) from None
    patient_id = str(ds.get("PatientID", "") or "")
    _scrub(ds, secret)
    if "PatientID" in ds or patient_id:
        ds.PatientID = hmac.new(secret.encode(), patient_id.encode(), hashlib.sha256).hexdigest()[:16] if patient_id else ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "lungcad: PS3.15 basic profile"
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", hashed_uid(secret, str(meta.MediaStorageSOPInstanceUID)))
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=meta is not None and "TransferSyntaxUID" in meta)
    summary = {
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "series_uid": str(ds.get("SeriesInstanceUID", "")),
        "modality": str(ds.get("Modality", "")),
        "burned_in_annotation": str(ds.get("BurnedInAnnotation", "")),
    }
    return out.getvalue(), summary
