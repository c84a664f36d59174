"""How the throughput benchmark watches the trainer's steps without changing them.

``PhaseProbe`` times each phase as the trainer's ``PhaseTimer`` does, with the GPU synchronised at the
phase's edges, its peak memory and a ``phase/<name>`` profiler range; ``RecordingProcessor`` records the
shape of every sample the step encodes (the analytic FLOPs need them); ``collective_seconds`` reads the
communication time of a profiled step.
"""

import contextlib
import time

import torch
from _common import CUDA, RssPeak, synchronize

from ril_fast.flops import Sample
from ril_fast.metrics import PhaseTimer


class PhaseProbe(PhaseTimer):
    """The trainer's phase timer, plus what a benchmark needs: the GPU is synchronised at each phase's
    edges (otherwise kernels a phase queued are billed to whichever phase next waits on the GPU), the
    phase's peak memory is recorded (``peak_bytes/<phase>`` in the step's metrics) and the phase is a
    ``phase/<name>`` range in torch.profiler traces."""

    def __init__(self):
        super().__init__()
        self.peak: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        synchronize()
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        watch = contextlib.nullcontext() if CUDA else RssPeak()
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(f"phase/{phase}"), watch:
                yield
                synchronize()
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() if CUDA else watch.bytes
            self.peak[phase] = max(self.peak.get(phase, 0), peak)

    def as_metrics(self) -> dict[str, float]:
        """``time/<phase>`` (seconds, unrounded) and ``peak_bytes/<phase>``."""
        return {**{f"time/{k}": v for k, v in self.seconds.items()},
                **{f"peak_bytes/{k}": v for k, v in self.peak.items()}}


class RecordingProcessor:
    """The trainer's processor (``inner``), recording the shape of every sample it encodes: prompts
    rendered for the rollout, then every output of the step (student ones carry their sampled ids)."""

    def __init__(self, processor):
        self.inner = processor
        self.clear()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def clear(self) -> None:
        """Forget what was recorded (call before each step)."""
        self.prompts, self.students, self.teachers, self.encoded = [], [], [], []

    def encode_prompt(self, question: str, images=None):
        """``Processor.encode_prompt`` (the rollout's prompts), recorded."""
        encoded = self.inner.encode_prompt(question, images)
        self.prompts.append(Sample.of(encoded))
        return encoded

    def encode(self, sample: dict):
        """``Processor.encode`` (the step's outputs), recorded."""
        encoded = self.inner.encode(sample)
        shape = Sample.of(encoded)
        (self.students if sample.get("response_ids") is not None else self.teachers).append(shape)
        self.encoded.append(encoded)
        return encoded


_COLLECTIVE_NAMES = ("nccl", "gloo:", "c10d::")


def collective_seconds(prof) -> dict[str, float]:
    """Seconds spent in collectives during a profiled step, per phase (``phase/<name>`` ranges) and in
    "total". On GPU: the device time of NCCL kernels. On CPU: gloo's collective ops, outermost only
    (a c10d op and the gloo op inside it count once). The phases are the CPU-side ranges only: on a GPU,
    kineto mirrors each ``record_function`` range as a CUDA-side "gpu_user_annotation" event of the same
    name, which would count each phase's collectives twice."""
    events = prof.events()
    phases = [(e.name.split("/", 1)[1], e.time_range.start, e.time_range.end) for e in events
              if e.name.startswith("phase/") and e.device_type == torch.autograd.DeviceType.CPU]

    def is_collective(e) -> bool:
        name = e.name.lower()
        if CUDA:
            return "nccl" in name and e.device_type == torch.autograd.DeviceType.CUDA
        return any(n in name for n in _COLLECTIVE_NAMES)

    spans = sorted((e.time_range.start, e.time_range.end) for e in events if is_collective(e))
    merged = []  # nested or overlapping ranges merged, so nothing counts twice
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out = {"total": sum(end - start for start, end in merged) / 1e6}
    for name, lo, hi in phases:
        overlap = sum(max(0, min(end, hi) - max(start, lo)) for start, end in merged)
        out[name] = out.get(name, 0.0) + overlap / 1e6
    return out
