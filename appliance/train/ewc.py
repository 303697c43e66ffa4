"""Elastic weight consolidation (EWC): a retrain may move the weights, but not the ones the old data needs.

    ewc = estimate_ewc(model, lam, batches, loss_of)   # at theta* (the production weights), before step 1
    loss.backward(); ewc.add_gradient(model)           # every optimizer step, before clipping

The penalty is lam / 2 * sum_i F_i (theta_i - theta*_i)^2 over the *trainable* parameters only (the
LoRA adapter of an LM, every weight of a classifier): frozen base weights never move, so they need
no anchor. F is the diagonal empirical Fisher at theta*: the mean, over micro-batches of earlier
training records, of the squared gradient of the batch loss (a batch-level estimate: cheap, and
smaller than the per-example Fisher, so lam absorbs the scale). It is measured in eval mode, which
draws no random numbers: a resumed job gets the same F and the same data order.

The penalty's gradient lam * F * (theta - theta*) is added to `.grad` directly rather than through
autograd: under torchrun every rank adds the same term after DDP has averaged the data gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from appliance.errors import AirlockError


@dataclass
class Ewc:
    lam: float
    anchor: dict[str, Any]
    """parameter name -> theta* (a detached copy of the weights training started from)"""
    fisher: dict[str, Any]
    """parameter name -> diagonal Fisher, same shape"""
    batches: int
    last_penalty: float = 0.0

    def penalty(self, model: Any) -> float:
        import torch

        total = 0.0
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self.fisher:
                    total += float((self.fisher[name] * (param.float() - self.anchor[name]) ** 2).sum())
        return self.lam / 2 * total

    def add_gradient(self, model: Any) -> float:
        """Add lam * F * (theta - theta*) to each anchored parameter's gradient; returns the penalty before the step."""
        import torch

        total = 0.0
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name not in self.fisher:
                    continue
                diff = param.float() - self.anchor[name]
                grad = (self.lam * self.fisher[name] * diff).to(param.dtype)
                param.grad = grad if param.grad is None else param.grad.add_(grad)
                total += float((self.fisher[name] * diff * diff).sum())
        self.last_penalty = self.lam / 2 * total
        return self.last_penalty

    def summary(self) -> dict[str, Any]:
        """Numbers for the run's metrics and the model card."""
        values = [f for f in self.fisher.values()]
        count = sum(int(f.numel()) for f in values)
        return {"lambda": self.lam, "fisher_batches": self.batches, "parameters": count,
                "fisher_mean": sum(float(f.sum()) for f in values) / count if count else 0.0,
                "fisher_max": max((float(f.max()) for f in values), default=0.0),
                "last_penalty": self.last_penalty}


def estimate_ewc(model: Any, lam: float, batches: Iterable[Any], loss_of: Callable[[Any], Any]) -> Ewc:
    """Anchor and diagonal Fisher of `model`'s trainable parameters, from `loss_of(batch)` over earlier data."""
    import torch

    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    model.eval()
    count = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss = loss_of(batch)
        if not torch.isfinite(loss):
            continue
        loss.backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach().float() ** 2
        count += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if count == 0:
        raise AirlockError("EWC needs earlier training records to measure which weights matter, and got none",
                           hint="retrain with ewc-lambda 0, or import the earlier data again")
    return Ewc(lam, {name: p.detach().float().clone() for name, p in params.items()},
               {name: f / count for name, f in fisher.items()}, count)


def lm_batch_loss(model: Any, batch: Any, device: str, autocast_dtype: Any) -> Any:
    """The token-weighted loss of one LM micro-batch (appliance.train.sft_data.MicroBatch)."""
    import torch

    with torch.autocast(device.split(":")[0], dtype=autocast_dtype, enabled=autocast_dtype is not None):
        inputs = {k: v.to(device) for k, v in batch.tensors().items()}
        return model(**inputs, use_cache=False).loss.float()
