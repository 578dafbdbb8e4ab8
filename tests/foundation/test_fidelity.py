"""Teacher/student agreement, mean KL and interleaved latency (issue 11)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from odekit.io.datasets import Split
from odekit.methods.evaluation import agreement, compare_latency


class _Fixed(nn.Module):
    """Returns given logits for sample i (inputs are the indices)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x.long().view(-1)]


def test_agreement_and_kl_match_hand_computation():
    teacher_logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    student_logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    split = Split(torch.arange(4).float().view(4, 1), torch.zeros(4, dtype=torch.long))
    out = agreement(_Fixed(teacher_logits), _Fixed(student_logits), split, batch_size=3)
    assert out["agreement"] == 0.75 and out["samples"] == 4
    p, q = torch.softmax(teacher_logits.double(), 1), torch.softmax(student_logits.double(), 1)
    expected = float((p * (p.log() - q.log())).sum(1).mean())
    assert out["mean_kl"] == pytest.approx(expected, rel=1e-12)
    same = agreement(_Fixed(teacher_logits), _Fixed(teacher_logits), split)
    assert same["agreement"] == 1.0 and same["mean_kl"] == pytest.approx(0.0, abs=1e-15)


def test_interleaved_latency_reports_median_iqr_per_batch_and_sample():
    model = nn.Linear(8, 4)
    result = compare_latency(model, model, torch.randn(16, 8), torch.device("cpu"), warmup=1, repeats=9)
    assert len(result.teacher_ms) == len(result.student_ms) == 9
    report = result.to_dict()
    teacher = report["teacher"]
    assert set(teacher) == {"median_ms_per_batch_of_16", "iqr_ms_per_batch_of_16", "median_ms_per_sample", "iqr_ms_per_sample"}
    assert teacher["median_ms_per_sample"] == pytest.approx(teacher["median_ms_per_batch_of_16"] / 16)
    assert teacher["iqr_ms_per_batch_of_16"] >= 0 and math.isfinite(report["speedup"])
