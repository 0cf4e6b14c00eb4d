"""What of a DICOM header may leave lungcad: UIDs to link results back, never who the patient is.

Results (CSV/JSON rows, web responses, logs) carry only `safe_metadata`: the Study/Series/SOP
Instance UIDs a PACS needs to file a result, the modality and instance/frame numbers. The patient's
name, id, birth date and every other identifying attribute stay behind. `deidentify` strips a
dataset itself (for anything written back or shown), after the DICOM PS3.15 basic profile's most
common identifying attributes; it is a helper, not a certified de-identification.
"""

from __future__ import annotations

import copy

SAFE_UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_SAFE_OTHER = ("Modality", "InstanceNumber")

# Identifying attributes removed by `deidentify` (PS3.15 Annex E basic profile, the common ones).
IDENTIFYING = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex", "PatientAge",
    "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "OtherPatientIDs",
    "OtherPatientNames", "OtherPatientIDsSequence", "PatientBirthName", "PatientWeight", "PatientSize",
    "MilitaryRank", "EthnicGroup", "PatientComments", "IssuerOfPatientID", "MedicalRecordLocator",
    "AccessionNumber", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName", "PhysiciansOfRecord",
    "RequestingPhysician", "StationName", "DeviceSerialNumber", "StudyID", "RequestAttributesSequence",
    "AdmittingDiagnosesDescription", "AdditionalPatientHistory", "Occupation", "CountryOfResidence",
    "RegionOfResidence", "ResponsiblePerson", "ResponsibleOrganization",
)


def safe_metadata(ds) -> dict:
    """The non-identifying header fields lungcad reports for a DICOM input."""
    out: dict = {}
    for key in SAFE_UID_KEYS + _SAFE_OTHER:
        value = getattr(ds, key, None)
        if value is None or value == "":
            continue
        out[key] = int(value) if key == "InstanceNumber" and str(value).lstrip("-").isdigit() else str(value)
    return out


def deidentify(ds, keep_private: bool = False):
    """A copy of the dataset without identifying attributes (and private tags unless asked).

    UIDs are kept on purpose: results must be linkable to the study they came from.
    """
    clean = copy.deepcopy(ds)
    for key in IDENTIFYING:
        if key in clean:
            delattr(clean, key)
    if not keep_private:
        clean.remove_private_tags()
    clean.PatientIdentityRemoved = "YES"
    return clean
