"""What of a DICOM header may leave lungcad, and de-identification of whatever is stored or shown.

Results (CSV/JSON rows, web responses, logs) carry only `safe_metadata`: the Study/Series/SOP
Instance UIDs a PACS needs to file a result, the modality and instance/frame numbers.

`deidentify` is the one de-identifier (the web app stores uploads through it): the DICOM PS3.15
Annex E basic application-level profile. Attributes that identify the patient, the staff, the
institution or the device are removed or emptied, dates kept out, private tags, overlays and
curves removed, and the file meta's application entity titles and addresses (which name the
sending and receiving devices) dropped. UIDs are either kept (results stay linkable to the PACS study) or, given a site
secret, replaced by keyed hashes (`2.25.<int>`), so slices of one study still share one (new)
study UID. Pixel data is kept: text burned into the pixels cannot be removed here
(`BurnedInAnnotation` is reported by the web app). A careful implementation of the profile, not a
certified de-identification.
"""

from __future__ import annotations

import copy
import hashlib
import hmac

from lungcad.utils import keyed_hash

__all__ = ["REMOVE", "REMOVE_META", "REPLACE", "SAFE_UID_KEYS", "deidentify", "hashed_uid", "safe_metadata"]

SAFE_UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_SAFE_OTHER = ("Modality", "InstanceNumber")

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
    "ContrastBolusAgent": "",  # free text that may name the patient's study (action D/Z; Type 2, so emptied)
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
    "TimezoneOffsetFromUTC",  # narrows down where and when the study was done (action X)
)
# File meta information: which devices sent and received the file (PS3.10 7.1), and private data.
REMOVE_META = (
    "SourceApplicationEntityTitle", "SendingApplicationEntityTitle", "ReceivingApplicationEntityTitle",
    "SourcePresentationAddress", "SendingPresentationAddress", "ReceivingPresentationAddress",
    "PrivateInformationCreatorUID", "PrivateInformation",
)


def safe_metadata(ds) -> dict:
    """The non-identifying header fields lungcad reports for a DICOM input."""
    out: dict = {}
    for key in SAFE_UID_KEYS + _SAFE_OTHER:
        try:
            value = getattr(ds, key, None)
        except Exception:  # pydicom's conversion of a malformed value (IS "inf", odd-length US): leave it out
            continue
        if value is None or value == "":
            continue
        out[key] = int(value) if key == "InstanceNumber" and str(value).lstrip("-").isdigit() else str(value)
    return out


def hashed_uid(secret: str, uid: str) -> str:
    """A valid UID (`2.25.<decimal>`, at most 64 chars) derived from `uid` with a site secret."""
    digest = hmac.new(secret.encode(), uid.encode(), hashlib.sha256).digest()[:16]  # 128 bits fit 2.25.
    return "2.25." + str(int.from_bytes(digest, "big"))


def _scrub(ds, secret: str | None) -> None:
    ds.remove_private_tags()
    for elem in list(ds):
        group = elem.tag.group
        if 0x6000 <= group <= 0x60FF or 0x5000 <= group <= 0x50FF:  # overlays and curves may hold text
            del ds[elem.tag]
        elif elem.VR == "UI" and elem.value and secret is not None and not elem.keyword.endswith("ClassUID") \
                and elem.keyword != "TransferSyntaxUID":
            elem.value = ([hashed_uid(secret, str(v)) for v in elem.value] if elem.VM > 1
                          else hashed_uid(secret, str(elem.value)))
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


def deidentify(ds, secret: str | None = None):
    """A de-identified copy of a pydicom dataset (the original is left as it is).

    Without `secret` the UIDs are kept and PatientID is emptied; with it, every UID (except class
    and transfer-syntax UIDs) and the PatientID become keyed hashes, stable within the site.
    """
    clean = copy.deepcopy(ds)
    patient_id = str(clean.get("PatientID", "") or "")
    _scrub(clean, secret)
    if "PatientID" in clean and patient_id and secret is not None:
        clean.PatientID = keyed_hash(secret, patient_id, length=16)
    clean.PatientIdentityRemoved = "YES"
    clean.DeidentificationMethod = "lungcad: PS3.15 basic profile" + ("" if secret is None else ", UIDs hashed")
    meta = getattr(clean, "file_meta", None)
    for keyword in REMOVE_META if meta is not None else ():
        if keyword in meta:
            delattr(meta, keyword)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta and secret is not None:
        meta.MediaStorageSOPInstanceUID = clean.get("SOPInstanceUID",
                                                    hashed_uid(secret, str(meta.MediaStorageSOPInstanceUID)))
    return clean
