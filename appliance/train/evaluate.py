"""End-of-training evaluation: perplexity, token accuracy, ROUGE-L and a few sample generations.

Samples quote the site's own data, so they are stored encrypted with the adapter and shown only
to people who may read the dataset; metrics are numbers and go to the catalog and model card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from appliance.train.sft_data import IGNORE, MicroBatch


@dataclass(frozen=True)
class EvalReport:
    loss: float
    perplexity: float
    token_accuracy: float
    rouge_l: float | None
    label_tokens: int
    samples: list[dict[str, str]] = field(default_factory=list, repr=False)

    def metrics(self) -> dict[str, Any]:
        return {"loss": self.loss, "perplexity": self.perplexity, "token_accuracy": self.token_accuracy,
                "rouge_l": self.rouge_l, "label_tokens": self.label_tokens}


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on whitespace tokens (longest common subsequence)."""
    a, b = candidate.split(), reference.split()
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def token_metrics(model: Any, batches: list[MicroBatch]) -> tuple[float, float, int]:
    """(mean loss, next-token accuracy) over label tokens, token-weighted."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct, tokens = 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            if batch.label_tokens == 0:
                continue
            inputs = {k: v.to(device) for k, v in batch.tensors().items()}
            out = model(**inputs, use_cache=False)
            labels = inputs["labels"][:, 1:]
            predictions = out.logits[:, :-1].argmax(-1)
            mask = labels != IGNORE
            correct += int((predictions[mask] == labels[mask]).sum())
            loss_sum += out.loss.float().item() * int(mask.sum())
            tokens += int(mask.sum())
    return (loss_sum / tokens if tokens else float("nan")), (correct / tokens if tokens else 0.0), tokens


def evaluate_lm(model: Any, tokenizer: Any, batches: list[MicroBatch], chat_records: list[dict[str, Any]], *,
                generations: int = 4, max_new_tokens: int = 64) -> EvalReport:
    """Metrics on the test split; ROUGE-L over up to `generations` chat records (greedy)."""
    import torch

    loss, accuracy, tokens = token_metrics(model, batches)
    scores, samples = [], []
    for record in chat_records[:generations]:
        messages = record["messages"]
        last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(messages[:last_assistant], tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        # Keep </think> (a special token here) to split reasoning from answer; drop end/pad markers.
        generated = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False)
        for marker in {tokenizer.eos_token, tokenizer.pad_token} - {None}:
            generated = generated.replace(marker, "")
        reference = messages[last_assistant]["content"]
        # Compare answers, not reasoning: both sides lose a <think> block if they have one.
        answer, expected = generated.split("</think>")[-1].strip(), reference.split("</think>")[-1].strip()
        scores.append(rouge_l(answer, expected))
        samples.append({"prompt": messages[last_assistant - 1]["content"] if last_assistant else "",
                        "generated": generated, "reference": reference})
    return EvalReport(loss, math.exp(min(loss, 50.0)) if loss == loss else float("nan"), accuracy,
                      sum(scores) / len(scores) if scores else None, tokens, samples)
