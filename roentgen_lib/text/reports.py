"""Radiology reports: read IU-Xray (shipped with torchxrayvision) and MIMIC-CXR, and pick the prompt.

RoentGen conditions on the IMPRESSION section, falling back to FINDINGS. `report_prompt(sections)`
does that, after `clean_text` has normalised whitespace and removed de-identification blanks
(`___` in MIMIC-CXR, `XXXX` in IU-Xray).
"""

from __future__ import annotations

import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from roentgen_lib.config import shipped_file

IU_REPORTS_FILE = "data/NLMCXR_reports.tgz"
PROMPT_SECTIONS = ("IMPRESSION", "FINDINGS")

# "x-XXXX" is IU-Xray's de-identification of "x-ray" (the word was masked as a possible name).
_IU_XRAY_WORD = re.compile(r"\bx-XXXX\b", re.IGNORECASE)
_BLANKS = re.compile(r"_{2,}|\bX{2,}\b")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:?])")
_REPEATED_PUNCT = re.compile(r"([.,;:])(?:\s*[.,;:])+")
_MIMIC_HEADER = re.compile(r"^\s*([A-Z][A-Z /&()-]{2,40}):", re.MULTILINE)


@dataclass(frozen=True)
class Report:
    """One report: its id, patient and study ids and its sections keyed by upper-case name."""

    report_id: str
    subject_id: str
    study_id: str
    sections: dict[str, str]
    mesh: tuple[str, ...] = ()  # IU-Xray MeSH "major" tags, e.g. "Pleural Effusion/right/small"

    @property
    def full_text(self) -> str:
        """Cleaned FINDINGS then IMPRESSION, the text the IU MeSH tags were assigned from."""
        return clean_text(" ".join(self.sections.get(s, "") for s in ("FINDINGS", "IMPRESSION")))


def clean_text(text: str) -> str:
    """Normalise whitespace and drop de-identification blanks, keeping sentence punctuation."""
    text = _IU_XRAY_WORD.sub("x-ray", text)
    text = _BLANKS.sub(" ", text)
    text = " ".join(text.split())
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _REPEATED_PUNCT.sub(r"\1", text)
    return text.strip(" ,;:")


def report_prompt(sections: dict[str, str]) -> str | None:
    """The cleaned IMPRESSION, else the cleaned FINDINGS, else None (nothing usable)."""
    for name in PROMPT_SECTIONS:
        text = clean_text(sections.get(name, ""))
        if any(ch.isalpha() for ch in text):
            return text
    return None


def read_iu_reports(path: Path | None = None) -> list[Report]:
    """Parse the IU-Xray (OpenI) report archive; by default the one torchxrayvision ships.

    Each report belongs to one patient (`CXRnnnn`), so the report id doubles as subject id.
    """
    path = path or shipped_file("torchxrayvision", IU_REPORTS_FILE)
    reports = []
    with tarfile.open(path, "r:gz") as archive:
        for member in archive.getmembers():
            if member.isfile() and member.name.endswith(".xml"):
                reports.append(parse_iu_xml(archive.extractfile(member).read()))
    return sorted(reports, key=lambda r: int(r.report_id.removeprefix("CXR")))


def parse_iu_xml(xml_bytes: bytes) -> Report:
    """One IU-Xray XML record to a Report (sections from AbstractText, MeSH major tags)."""
    root = ET.fromstring(xml_bytes)
    uid = root.find("uId").attrib["id"]
    sections = {
        node.attrib.get("Label", "").upper(): (node.text or "").strip()
        for node in root.iter("AbstractText")
    }
    mesh = tuple(node.text.strip() for node in root.findall(".//MeSH/major") if node.text)
    return Report(report_id=uid, subject_id=uid, study_id=uid, sections=sections, mesh=mesh)


def parse_mimic_sections(text: str) -> dict[str, str]:
    """Split a MIMIC-CXR free-text report into sections keyed by upper-case header.

    Headers are upper-case words ending in a colon at the start of a line ("IMPRESSION:").
    Text before the first header is kept under "PREAMBLE".
    """
    sections: dict[str, str] = {}
    matches = list(_MIMIC_HEADER.finditer(text))
    sections["PREAMBLE"] = text[: matches[0].start()] if matches else text
    for match, following in zip(matches, matches[1:] + [None]):
        end = following.start() if following else len(text)
        name = " ".join(match.group(1).split())
        sections[name] = (sections.get(name, "") + " " + text[match.end() : end]).strip()
    return sections


def read_report_file(path: Path) -> str:
    """Read a report as text whatever its encoding: UTF-16 with a BOM, UTF-8 (with or without BOM), else Latin-1."""
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")
