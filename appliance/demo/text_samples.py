"""The demo's text datasets: synthetic maintenance Q&A and de-identified-style report summaries.

    python -m appliance.demo.text_samples   # rewrites appliance/demo/data/*.jsonl (seeded, same bytes)

Everything is invented for the repository: "Plant North", its machines, parts and lockout
procedure codes, and the report snippets, whose patient and date fields are already the
placeholders a de-identified export would carry. Two files ship:

- `site_qa.jsonl`: the first import (a few hundred chat records in OpenAI `messages` format);
- `site_qa_new.jsonl`: records that arrive later (two machines installed since, more reports),
  for the demo's incremental retrain.

Each machine has one first-check part and one procedure code, so what a LoRA adapter has to learn
is site knowledge the base model cannot guess: validation loss shows whether it did.
`tests/appliance/demo/test_samples.py` checks the committed files equal a fresh run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).with_name("data")
FIRST_BATCH = DATA_DIR / "site_qa.jsonl"
NEW_BATCH = DATA_DIR / "site_qa_new.jsonl"
SEED = 20261123

# machine -> (part to check first, lockout procedure code). The words are the tiny model's own
# (models/corpus); the pairing and the codes are this site's knowledge.
MACHINES = {
    "press line 2": ("hydraulic pump", "LOTO-P2"),
    "CNC mill 4": ("spindle bearing", "LOTO-M4"),
    "conveyor B": ("drive belt", "LOTO-CB"),
    "paint robot 7": ("servo motor", "LOTO-R7"),
    "injection moulder 3": ("pressure sensor", "LOTO-IM3"),
    "welding cell 5": ("limit switch", "LOTO-W5"),
    "packaging unit 1": ("vacuum gripper", "LOTO-PK1"),
    "compressor C2": ("air filter", "LOTO-C2"),
}
NEW_MACHINES = {
    "bottling line 3": ("gearbox seal", "LOTO-BL3"),
    "laser cutter 6": ("coolant valve", "LOTO-L6"),
}
SYMPTOMS = ("abnormal vibration", "temperature above limit", "oil leak at the seal", "intermittent stop",
            "noise during start-up", "pressure drop", "slow cycle time", "misaligned output",
            "burnt smell near the cabinet")
QUESTIONS = (
    "The {machine} shows {symptom}. What should I check first?",
    "Night shift reports {symptom} on the {machine}. What should I check first?",
    "What is the first check when the {machine} shows {symptom}?",
)
PROCEDURE_QUESTIONS = (
    "Which lockout procedure applies to the {machine}?",
    "I need to open the {machine}. Which procedure do I follow?",
)
REGIONS = ("chest", "abdomen", "left knee", "right shoulder", "lumbar spine", "head", "pelvis")
MODALITIES = ("radiograph", "CT", "MRI", "ultrasound")
FINDINGS = {
    "normal": ("No acute abnormality.", "Lungs are clear.", "Alignment is preserved.",
               "No fracture or dislocation.", "Soft tissues are unremarkable."),
    "abnormal": ("Small opacity in the lower zone.", "Mild degenerative change.", "Small joint effusion.",
                 "Minimal pleural thickening.", "Subtle cortical irregularity, follow-up advised."),
}
IMPRESSIONS = {"normal": "Normal study.", "abnormal": "Findings as described; clinical correlation advised."}


def _chat(question: str, thought: str, answer: str) -> dict:
    # DeepSeek-R1 style: the reasoning inside <think>, then the answer (the chat template opens <think>).
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": f"<think>\n{thought}\n</think>\n\n{answer}"}]}


def maintenance_records(machines: dict[str, tuple[str, str]]) -> list[dict]:
    records = []
    for machine, (part, code) in machines.items():
        for n, symptom in enumerate(SYMPTOMS):
            question = QUESTIONS[(n + len(machine)) % len(QUESTIONS)].format(machine=machine, symptom=symptom)
            records.append(_chat(question, f"{symptom} on the {machine} usually points at the {part}.",
                                 f"Check the {part} first. Stop the {machine}, lock it out under {code}, inspect "
                                 f"the {part} for wear and log what you find."))
        for template in PROCEDURE_QUESTIONS:
            records.append(_chat(template.format(machine=machine), f"The {machine} is locked out under {code}.",
                                 f"{code}. Isolate the {machine} at its main switch, lock and tag it, and test "
                                 f"that it cannot start before you open a guard."))
    return records


def report_records(rng: random.Random, count: int) -> list[dict]:
    """Report snippets as a de-identified export shows them: [PATIENT] and [DATE] stand where the PHI was."""
    records, seen = [], set()
    while len(records) < count:
        label = rng.choice(("normal", "abnormal"))
        modality, region = rng.choice(MODALITIES), rng.choice(REGIONS)
        findings = " ".join(rng.sample(FINDINGS[label], 2))
        report = (f"Report. Patient: [PATIENT]. Date: [DATE]. Examination: {modality} of the {region}. "
                  f"Findings: {findings} Impression: {IMPRESSIONS[label]}")
        if report in seen:
            continue
        seen.add(report)
        records.append(_chat(f"Summarise this report in one line: {report}",
                             f"The impression says the {region} study is {label}.",
                             f"{label.capitalize()} study of the {region}."))
    return records


def first_batch() -> list[dict]:
    rng = random.Random(SEED)  # noqa: S311 - sample data, not secrets
    records = maintenance_records(MACHINES) + report_records(rng, 150)
    rng.shuffle(records)
    return records


def new_batch() -> list[dict]:
    rng = random.Random(SEED + 1)  # noqa: S311 - sample data, not secrets
    old = {json.dumps(r, sort_keys=True) for r in first_batch()}
    reports = [r for r in report_records(rng, 60) if json.dumps(r, sort_keys=True) not in old][:40]
    records = maintenance_records(NEW_MACHINES) + reports
    rng.shuffle(records)
    return records


def to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def main() -> None:
    DATA_DIR.mkdir(exist_ok=True)
    for path, records in ((FIRST_BATCH, first_batch()), (NEW_BATCH, new_batch())):
        path.write_text(to_jsonl(records), encoding="utf-8")
        print(f"{path}: {len(records)} records")


if __name__ == "__main__":
    main()
