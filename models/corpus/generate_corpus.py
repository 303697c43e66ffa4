"""Write the synthetic text corpus the tiny demo model is trained on.

    python models/corpus/generate_corpus.py   # rewrites models/corpus/corpus.jsonl

Everything here is invented: factory maintenance logs and radiology-style report snippets
written from templates, plus question/answer dialogues about them. No real patient, site or
machine appears. The output is committed; rerunning with the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261122
OUT = Path(__file__).with_name("corpus.jsonl")

MACHINES = ["press line 2", "CNC mill 4", "conveyor B", "paint robot 7", "injection moulder 3",
            "welding cell 5", "packaging unit 1", "compressor C2", "laser cutter 6", "oven 9"]
PARTS = ["spindle bearing", "hydraulic pump", "drive belt", "servo motor", "coolant valve",
         "vacuum gripper", "pressure sensor", "limit switch", "gearbox seal", "air filter"]
SYMPTOMS = ["abnormal vibration", "temperature above limit", "oil leak at the seal",
            "intermittent stop", "noise during start-up", "pressure drop", "slow cycle time",
            "error code E{code}", "misaligned output", "burnt smell near the cabinet"]
ACTIONS = ["replaced the {part}", "tightened the {part} mounting", "cleaned and lubricated the {part}",
           "recalibrated the {part}", "reset the controller and tested the {part}",
           "ordered a new {part} and applied a temporary fix"]
OUTCOMES = ["machine returned to production", "test run passed", "monitor for 48 hours",
            "follow-up inspection scheduled", "no further faults observed"]

REGIONS = ["chest", "abdomen", "left knee", "right shoulder", "lumbar spine", "head", "pelvis"]
MODALITIES = ["radiograph", "CT", "MRI", "ultrasound"]
FINDINGS = {
    "normal": ["No acute abnormality.", "Lungs are clear.", "Alignment is preserved.",
               "No fracture or dislocation.", "Soft tissues are unremarkable."],
    "abnormal": ["Small opacity in the lower zone.", "Mild degenerative change.",
                 "Small joint effusion.", "Minimal pleural thickening.",
                 "Subtle cortical irregularity, follow-up advised."],
}
IMPRESSIONS = {"normal": "Normal study.", "abnormal": "Findings as described; clinical correlation advised."}


def maintenance_log(rng: random.Random) -> str:
    machine, part = rng.choice(MACHINES), rng.choice(PARTS)
    symptom = rng.choice(SYMPTOMS).format(code=rng.randint(100, 999))
    action = rng.choice(ACTIONS).format(part=part)
    hours = rng.randint(1, 8)
    return (f"Maintenance log. Machine: {machine}. Reported: {symptom}. "
            f"Cause: worn {part}. Action: {action}. Downtime: {hours} h. "
            f"Result: {rng.choice(OUTCOMES)}.")


def report(rng: random.Random) -> tuple[str, str, str]:
    label = rng.choice(["normal", "abnormal"])
    region, modality = rng.choice(REGIONS), rng.choice(MODALITIES)
    findings = " ".join(rng.sample(FINDINGS[label], 2))
    text = (f"Report. Examination: {modality} of the {region}. Findings: {findings} "
            f"Impression: {IMPRESSIONS[label]}")
    return text, label, region


def dialogue(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        machine, part = rng.choice(MACHINES), rng.choice(PARTS)
        symptom = rng.choice(SYMPTOMS).format(code=rng.randint(100, 999))
        question = f"The {machine} shows {symptom}. What should I check first?"
        answer = (f"Check the {part} first. Stop the {machine}, lock it out, inspect the {part} "
                  f"for wear and log what you find.")
        thought = f"{symptom} on the {machine} usually points at the {part}."
    else:
        text, label, region = report(rng)
        question = f"Summarise this report in one line: {text}"
        answer = f"{label.capitalize()} study of the {region}."
        thought = f"The impression says the {region} study is {label}."
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": f"<think>\n{thought}\n</think>\n\n{answer}"}]}


def main() -> None:
    rng = random.Random(SEED)
    lines = []
    for _ in range(1500):
        kind = rng.random()
        if kind < 0.4:
            lines.append({"text": maintenance_log(rng)})
        elif kind < 0.7:
            lines.append({"text": report(rng)[0]})
        else:
            lines.append(dialogue(rng))
    OUT.write_text("".join(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n" for line in lines),
                   encoding="utf-8")
    print(f"wrote {len(lines)} records to {OUT}")


if __name__ == "__main__":
    main()
