"""A rule-based CheXpert-style labeler: observations, negation, uncertainty, laterality, severity.

`label_report(text)` returns, for every CheXpert observation the report mentions, a dict with
`status` ("positive" | "negative" | "uncertain"), `laterality` ("left" | "right" | "bilateral" |
None) and `severity` ("small" | "moderate" | "large" | None; mild = small, severe = large); for
lung-zone findings also `zone` ("upper" | "middle" | "lower" | None). Unmentioned observations are
absent; "No Finding" is positive when no pathology is positive or uncertain (as in CheXpert).

How it decides, per sentence and per mention:
- cues before the mention in its sentence, back to the last scope closer ("but", "however",
  "no acute cardiopulmonary process", "no change in"), decide: any negation ("no", "without",
  "free of", "negative for") makes it negative, even past a hedge ("no pleural line to suggest
  pneumothorax"); else any uncertainty ("may", "possible", "cannot exclude") makes it uncertain;
- with no negation or uncertainty cue before it since the last scope closer, a cue after it in the
  same clause ("... has resolved", "... is not excluded") decides; otherwise the mention is positive;
- phrases that state normality ("heart size is normal", "costophrenic angles are sharp") are
  negative mentions of their observation;
- across mentions of one observation: positive beats uncertain beats negative; sides of positive
  mentions are merged (left + right = bilateral); the largest severity is kept.
Laterality, severity and zone words are read from the words that belong to the mention: from the
previous mention (or sentence start) to the end of this mention, else up to the next mention.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
PATHOLOGIES = tuple(o for o in OBSERVATIONS if o not in ("No Finding", "Support Devices"))
ZONED = ("Lung Opacity", "Consolidation", "Pneumonia", "Atelectasis", "Lung Lesion")
STATUS_RANK = {"negative": 0, "uncertain": 1, "positive": 2}
SEVERITY_RANK = {None: -1, "small": 0, "moderate": 1, "large": 2}

_BE = r"(?:\s+(?:is|are|appears?|remains?|seems?|looks?))?"
_HEART = r"(?:heart(?:\s+size)?|cardiac\s+(?:size|silhouette|shadow|contours?)|cardiac)"
_MEDIASTINUM = r"(?:cardiomediastinal|mediastinal|mediastinum)(?:\s+(?:silhouette|contours?|structures|width))?"
_NORMAL = (
    r"(?:normal(?:\s+in\s+size)?|within\s+(?:the\s+)?(?:normal\s+limits|limits\s+of\s+normal)"
    r"|unremarkable|not\s+enlarged)"
)

# Mentions that assert the observation (status then comes from cues).
MENTIONS: dict[str, list[str]] = {
    "Enlarged Cardiomediastinum": [
        r"(?:widen(?:ed|ing)|enlarged|prominent)\s+(?:the\s+)?" + _MEDIASTINUM,
        _MEDIASTINUM + _BE + r"\s+(?:\w+\s+)?(?:widened|enlarged|prominent)",
        r"mediastinal\s+widening",
    ],
    "Cardiomegaly": [
        r"cardiomegaly",
        r"(?:cardiac|heart)\s+enlargement",
        r"borderline\s+(?:heart|cardiac)(?:\s+(?:size|silhouette))?",
        r"enlarge(?:d|ment\s+of\s+the)\s+(?:heart|cardiac\s+(?:silhouette|shadow))",
        _HEART + _BE + r"\s+(?:\w+\s+)?(?:enlarged|large|prominent|borderline)",
    ],
    "Lung Opacity": [
        r"opaci(?:ty|ties|fication|fications|fied)",
        r"infiltra(?:te|tes|tion|tive)",
        r"air[\s-]?space\s+(?:disease|process)",
        r"(?:lung|pulmonary|parenchymal|airspace|patchy|hazy|focal|increased)\s+densit(?:y|ies)",
        r"haziness",
        r"ground[\s-]glass",
        r"interstitial\s+(?:markings?|prominence|pattern|thickening|disease|process)",
        r"reticula(?:r|tion)\w*",
    ],
    "Lung Lesion": [
        r"nodul(?:e|es|ar)",
        r"mass(?:es)?",
        r"lesions?",
        r"tumou?rs?",
        r"neoplasms?",
        r"carcinoma",
        r"metasta\w+",
    ],
    "Edema": [
        r"(?<!soft\stissue\s)edema",
        r"heart\s+failure",
        r"pulmonary\s+venous\s+hypertension",
        r"cephalization",
        r"vascular\s+(?:redistribution|indistinctness|engorgement)",
        r"indistinct\s+(?:pulmonary\s+)?vascula\w*",
        r"(?:prominen\w*|engorge\w*|increased|congest\w*)\s+(?:of\s+)?(?:the\s+)?(?:\w+\s+){0,2}?vascula\w*",
        r"vascula\w*(?:\s+markings?)?" + _BE + r"\s+(?:\w+\s+)?(?:prominen\w*|engorged|increased|congested)",
        r"(?:pulmonary|vessels?)\s+(?:\w+\s+)?(?:are\s+|is\s+)?engorged",
        r"(?:pulmonary|vascular|interstitial)\s+(?:vascular\s+)?congestion",
        r"chf",
        r"fluid\s+overload",
    ],
    "Consolidation": [r"consolidat\w*"],
    "Pneumonia": [r"(?:broncho)?pneumon(?:ia|ias|itis)", r"(?<!granulomatous\s)infecti(?:on|ous(?:\s+process)?)"],
    "Atelectasis": [r"atelecta\w*", r"(?:lobar|lobe|segmental)\s+collapse"],
    "Pneumothorax": [r"pneumothora(?:x|ces)", r"ptx", r"pleural\s+air(?:\s+collections?)?"],
    "Pleural Effusion": [
        r"(?<!pericardial\s)effusions?",
        r"pleural\s+fluid",
        r"hydrothorax",
    ],
    "Pleural Other": [
        r"pleural\s+(?:thickening|scarring|plaques?|calcifications?)",
        r"apical\s+(?:pleural\s+)?(?:cap|capping|scarring)",
        r"fibrothorax",
    ],
    "Fracture": [r"fractur\w*"],
    "Support Devices": [
        r"pacemaker",
        r"pacer",
        r"defibrillator",
        r"a?icd",
        r"picc",
        r"catheters?",
        r"(?:central|venous|jugular|subclavian|midline|arterial|swan[\s-]ganz)\s+(?:venous\s+)?lines?",
        r"(?:endotracheal|et|nasogastric|ng|og|orogastric|enteric|feeding|chest|tracheostomy|dobhoff)\s+tubes?",
        r"tracheostomy",
        r"port[\s-]?a[\s-]?cath",
        r"(?:chest|power|infusion|venous)\s+port",
        r"stents?",
        r"sternotomy\s+wires?",
        r"(?:pacing|cardiac)\s+(?:leads?|wires?)",
        r"(?:external\s+)?(?:cardiac\s+)?monitor(?:ing)?\s+(?:leads?|devices?)",
        r"(?:cardiac\s+)?generator",
        r"(?:spinal\s+)?stimulator",
        r"(?:valve\s+(?:replacement|prosthesis)|prosthetic\s+(?:\w+\s+)?valve)",
        r"tip\s+(?:is\s+)?(?:projecting|projects|in|at|overlying|overlies|near|terminat\w*)",
    ],
}

# Mentions that state the observation is absent or normal.
NORMAL_MENTIONS: dict[str, list[str]] = {
    "Cardiomegaly": [
        r"normal\s+(?:heart|cardiac)(?:\s+(?:size|silhouette|shadow|contours?))?",
        _HEART + r"(?:\s+and\s+[a-z]+(?:\s+[a-z]+)?)?" + _BE + r"\s+" + _NORMAL,
    ],
    "Enlarged Cardiomediastinum": [
        r"normal\s+" + _MEDIASTINUM,
        _MEDIASTINUM + r"(?:\s+and\s+[a-z]+(?:\s+[a-z]+)?)?" + _BE + r"\s+" + _NORMAL,
    ],
    "Pleural Effusion": [r"costophrenic\s+(?:angles?|sulci|recesses)" + _BE + r"\s+(?:sharp|clear|preserved)"],
    "Lung Opacity": [r"lungs?" + _BE + r"\s+clear"],
    "Edema": [r"(?:pulmonary\s+)?vascula(?:rity|ture)" + _BE + r"\s+" + _NORMAL],
}

NEGATION_CUES = [
    r"no",
    r"not",
    r"without",
    r"free\s+of",
    r"clear\s+of",
    r"negative\s+for",
    r"absence\s+of",
    r"resolution\s+of",
    r"resolved",
    r"rule[sd]?\s+out",
    r"ruled\s+out",
    r"neither",
    r"nor",
    r"(?:previous|prior|history\s+of|sequelae?\s+of)",  # past disease is not a current finding
]
UNCERTAIN_CUES = [
    r"(?:cannot|can\s+not|can't|could\s+not)\s+(?:be\s+)?(?:exclude[sd]?|ruled?\s+out)",
    r"not\s+(?:be\s+)?excluded",
    r"may",
    r"might",
    r"could",
    r"possibl[ey]",
    r"probabl[ey]",
    r"likely",
    r"question(?:able)?(?:\s+of)?",
    r"suspect(?:ed)?",
    r"suspicious(?:\s+for)?",
    r"concerning\s+for",
    r"worrisome\s+for",
    r"evaluation\s+for",
    r"concern\s+for",
    r"suggest(?:s|ed|ive|ing)?(?:\s+of)?",
    r"versus",
    r"vs",
    r"differential",
    r"equivocal",
    r"(?:difficult|unable)\s+to\s+(?:\w+\s+)?exclude",
    r"correlat(?:e|ion)(?:\s+clinically)?(?:\s+for)?",
    r"compatible\s+with",
    r"(?:a\s+)?consideration",
    r"cannot\s+be\s+excluded",
]
# Phrases that end a negation's reach ("no pneumothorax, but a small effusion").
SCOPE_CLOSERS = [
    r"compar(?:ed|ison)\s+(?:to|with)\s+(?:the\s+)?(?:prior|previous)(?:\s+(?:study|exam|examination|film|radiograph))?",
    r"no\s+(?:acute|active)\s+(?:(?:cardiopulmonary|intrathoracic|thoracic|chest|cardiac|osseous|bony)\s+)?"
    r"(?:process|processes|abnormality|abnormalities|disease|findings?|pathology)(?!\s*(?:/|,|or\b|and\b))",
    r"no\s+(?:significant\s+|interval\s+|other\s+)?(?:change|increase|decrease|worsening|improvement)(?:\s+in|\s+of)?",
    r"not\s+(?:significantly\s+)?(?:changed|increased)",
    r"but",
    r"however",
    r"although",
    r"though",
    r"except",
    r"aside\s+from",
    r"apart\s+from",
    r"otherwise",
    r"and\s+(?:there|the|a|an)",
    r"which",
    r"with",
]
POST_NEGATION = [
    r"(?:is|are|has|have)?\s*(?:not|no\s+longer)\s+(?:been\s+)?(?:seen|identified|present|visualized|evident|appreciated|demonstrated|noted)",
    r"(?:has|have)?\s*(?:been\s+)?(?:resolved|removed|cleared)",
    r"(?:is|are)\s+absent",
    r"(?:is|are|appears?)?\s*within\s+(?:the\s+)?(?:limits\s+of\s+normal|normal\s+limits)",
    r"(?:is|are)\s+not\s+(?:\w+\s+)?(?:engorged|enlarged|prominent|widened)",
]
POST_UNCERTAIN = [
    r"(?:cannot|can\s+not|can't)\s+be\s+(?:excluded|ruled\s+out)",
    r"(?:is|are)?\s*not\s+(?:be\s+)?excluded",
    r"(?:is|are)\s+(?:possible|questioned|suspected|likely|not\s+certain)",
    r"(?:is|are)\s+in\s+the\s+differential",
    r"(?:would\s+be|is)\s+(?:a|another)\s+consideration",
    r"(?:cannot|can\s+not)\s+be\s+(?:\w+\s+)?(?:excluded|ruled\s+out)",
]

LATERALITY_WORDS = {
    "left": "left",
    "right": "right",
    "bilateral": "bilateral",
    "bilaterally": "bilateral",
    "both": "bilateral",
    "bibasilar": "bilateral",
    "bibasal": "bilateral",
    "biapical": "bilateral",
}
SEVERITY_WORDS = {
    "tiny": "small", "trace": "small", "small": "small", "minimal": "small", "minimally": "small",
    "mild": "small", "mildly": "small", "borderline": "small", "slight": "small", "slightly": "small", "subtle": "small",
    "moderate": "moderate", "moderately": "moderate", "moderate-sized": "moderate",
    "large": "large", "severe": "large", "severely": "large", "massive": "large",
    "extensive": "large", "marked": "large", "markedly": "large", "substantial": "large",
}
ZONE_WORDS = {
    "upper": "upper", "apical": "upper", "apex": "upper", "apices": "upper",
    "middle": "middle", "mid": "middle", "lingula": "middle", "lingular": "middle", "perihilar": "middle",
    "lower": "lower", "base": "lower", "bases": "lower", "basilar": "lower", "basal": "lower",
    "bibasilar": "lower", "bibasal": "lower", "retrocardiac": "lower", "infrahilar": "lower",
}
DEVICE_KINDS = {
    "pacemaker": r"\b(?:pacemaker|pacer|defibrillator|a?icd|pacing\s+leads?|cardiac\s+leads?)\b",
    "tube": r"\b(?:endotracheal|et|nasogastric|ng|og|orogastric|enteric|feeding|tracheostomy|dobhoff)\s+tubes?\b|\btracheostomy\b",
    "chest_tube": r"\bchest\s+tubes?\b",
    "line": r"\b(?:picc|catheters?|port[\s-]?a[\s-]?cath|(?:central|venous|jugular|subclavian|midline)\s+(?:venous\s+)?lines?|(?:chest|power|infusion|venous)\s+port)\b",
}


def _group(patterns: Iterable[str]) -> str:
    return "(?:" + "|".join(patterns) + ")"


def _compile_mentions() -> re.Pattern[str]:
    """One alternation over all observations; normal phrases first so they win at a position."""
    parts = []
    for i, obs in enumerate(OBSERVATIONS):
        if obs in NORMAL_MENTIONS:
            parts.append(rf"(?P<n{i}>\b{_group(NORMAL_MENTIONS[obs])}\b)")
    for i, obs in enumerate(OBSERVATIONS):
        if obs in MENTIONS:
            parts.append(rf"(?P<m{i}>\b{_group(MENTIONS[obs])}\b)")
    return re.compile("|".join(parts), re.IGNORECASE)


def _compile_cues(groups: dict[str, list[str]]) -> re.Pattern[str]:
    return re.compile(
        "|".join(rf"(?P<{name}>\b{_group(pats)}\b)" for name, pats in groups.items()), re.IGNORECASE
    )


_MENTION_RE = _compile_mentions()
# Order matters at one position: uncertainty phrases ("cannot be excluded") before negation ("not").
_PRE_CUE_RE = _compile_cues({"close": SCOPE_CLOSERS, "uncertain": UNCERTAIN_CUES, "negative": NEGATION_CUES})
_POST_CUE_RE = _compile_cues({"uncertain": POST_UNCERTAIN, "negative": POST_NEGATION, "close": SCOPE_CLOSERS})
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+|(?<=[a-z])\.(?=[A-Z])")
_WORD = re.compile(r"[a-z][a-z-]*")
_DEVICE_RES = {kind: re.compile(p, re.IGNORECASE) for kind, p in DEVICE_KINDS.items()}


def split_sentences(text: str) -> list[str]:
    """Sentences (and semicolon clauses); decimals such as "1.5 cm" stay whole."""
    return [s for s in _SENTENCE_SPLIT.split(text) if s.strip()]


def find_mentions(sentence: str) -> list[tuple[str, int, int, bool]]:
    """(observation, start, end, is_normal_phrase) for every mention in one sentence."""
    found = []
    for match in _MENTION_RE.finditer(sentence):
        name = match.lastgroup
        found.append((OBSERVATIONS[int(name[1:])], match.start(), match.end(), name[0] == "n"))
    return found


def mention_status(sentence: str, start: int, end: int) -> str:
    """Status of the mention at [start, end): from the cues before it since the last scope closer (negation
    first, then uncertainty), else from the first cue after it."""
    kinds = [m.lastgroup for m in _PRE_CUE_RE.finditer(sentence, 0, start) if m.end() <= start]
    in_scope = kinds[len(kinds) - kinds[::-1].index("close"):] if "close" in kinds else kinds
    if "negative" in in_scope:
        return "negative"
    if in_scope:
        return "uncertain"
    # No cue since the last scope closer ("heart size is normal but effusion is not seen."): one after decides.
    after = _POST_CUE_RE.search(sentence, end)
    if after and after.lastgroup != "close":
        return after.lastgroup
    return "positive"


def _read_words(text: str, table: dict[str, str]) -> list[str]:
    return [table[w] for w in _WORD.findall(text.lower()) if w in table]


def merge_laterality(sides: Iterable[str | None]) -> str | None:
    """left + right, or any bilateral word, is bilateral; no side word is None."""
    found = {s for s in sides if s}
    if "bilateral" in found or {"left", "right"} <= found:
        return "bilateral"
    return found.pop() if found else None


def _mention_attributes(span_text: str, tail_text: str) -> dict[str, str | None]:
    """Laterality, severity and zone words of one mention (its own words first, then its tail)."""
    attrs: dict[str, str | None] = {}
    for key, table in (("laterality", LATERALITY_WORDS), ("severity", SEVERITY_WORDS), ("zone", ZONE_WORDS)):
        words = _read_words(span_text, table) or _read_words(tail_text, table)
        if key == "laterality":
            attrs[key] = merge_laterality(words)
        else:
            attrs[key] = words[-1] if words else None
    return attrs


def label_sentence(sentence: str) -> list[tuple[str, dict[str, str | None]]]:
    """Every mention of one sentence with its status, laterality, severity and zone."""
    mentions = find_mentions(sentence)
    labelled = []
    for k, (obs, start, end, is_normal) in enumerate(mentions):
        span_start = mentions[k - 1][2] if k else 0
        tail_end = mentions[k + 1][1] if k + 1 < len(mentions) else len(sentence)
        status = "negative" if is_normal else mention_status(sentence, start, end)
        attrs = _mention_attributes(sentence[span_start:end], sentence[end:tail_end])
        labelled.append((obs, {"status": status, **attrs}))
    return labelled


def merge_mentions(current: dict | None, new: dict) -> dict:
    """Combine two mentions of one observation: higher status wins; sides and sizes merge."""
    if current is None:
        return dict(new)
    if STATUS_RANK[new["status"]] > STATUS_RANK[current["status"]]:
        winner, other = dict(new), current
    else:
        winner, other = dict(current), new
    if other["status"] == winner["status"]:
        winner["laterality"] = merge_laterality([winner["laterality"], other["laterality"]])
        winner["severity"] = max(winner["severity"], other["severity"], key=SEVERITY_RANK.get)
        winner["zone"] = winner["zone"] or other["zone"]
    return winner


def label_report(text: str) -> dict[str, dict[str, str | None]]:
    """CheXpert-style labels of a report; see the module docstring for the rules."""
    labels: dict[str, dict] = {}
    for sentence in split_sentences(text):
        for obs, mention in label_sentence(sentence):
            labels[obs] = merge_mentions(labels.get(obs), mention)
    for obs, label in labels.items():
        if obs not in ZONED:
            label.pop("zone", None)
    if not any(labels.get(p, {}).get("status") in ("positive", "uncertain") for p in PATHOLOGIES):
        labels["No Finding"] = {"status": "positive", "laterality": None, "severity": None}
    return {obs: labels[obs] for obs in OBSERVATIONS if obs in labels}


def device_kinds(text: str) -> list[str]:
    """Kinds of support device a report names (pacemaker, tube, chest_tube, line), in that order."""
    return [kind for kind, pattern in _DEVICE_RES.items() if pattern.search(text)]


STATUS_VALUE = {"positive": 1.0, "negative": 0.0, "uncertain": -1.0}


def label_vector(labels: dict[str, dict]) -> dict[str, float | None]:
    """CheXpert's numeric encoding per observation: 1 positive, 0 negative, -1 uncertain, None absent."""
    return {obs: STATUS_VALUE[labels[obs]["status"]] if obs in labels else None for obs in OBSERVATIONS}


def label_table(texts: Iterable[str]) -> "pd.DataFrame":
    """One row per (text, mentioned observation) with status, laterality and severity, for display."""
    import pandas as pd

    rows = [{"text": text, "observation": obs, **{k: lab.get(k) for k in ("status", "laterality", "severity")}}
            for text in texts for obs, lab in label_report(text).items()]
    return pd.DataFrame(rows)
