"""Cached or online teacher outputs? The cost of one student step against the teacher's forward pass.

Measured in one process, one thread, on random inputs (cost does not depend on the values): a student
training step (forward and backward of ``cpmobile_60k`` and its heads on 64 crops of 0.96 s) against
the teacher's forward pass on the same 64 patches (online distillation would add it to every step),
and the one-off cost of caching every crop position of every clip.

    python -m bench.teacher_cost
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from sceneprint.config import apply_overrides
from sceneprint.training.student import CROP_FRAMES, Student, StudentConfig
from sceneprint.training.teacher import Teacher, TeacherConfig


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--clips", type=int, default=1600, help="clips to cache (sceneprint-dev: 1,600)")
    parser.add_argument("--positions", type=int, default=26, help="crop positions per clip (hop 16 frames, 5 s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    student = Student(apply_overrides(StudentConfig(), ['teacher=""', "loss.beta=0", "loss.gamma=0"]), 30)
    teacher = Teacher(TeacherConfig(), 30).eval()
    crops = torch.randn(args.batch, 1, 128, CROP_FRAMES)
    patches = torch.randn(args.batch, CROP_FRAMES, 64)
    opt = torch.optim.AdamW(student.parameters())

    def student_step() -> None:
        out = student(crops)
        loss = out["logits"].logsumexp(1).mean() + out["projection"].square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def teacher_forward() -> None:
        with torch.inference_mode():
            teacher(patches)

    s, t = timed(student_step, args.repeats), timed(teacher_forward, args.repeats)
    result = {
        "command": "python -m bench.teacher_cost", "threads": 1, "batch": args.batch,
        "student_step_ms": round(1000 * s, 1), "teacher_forward_ms": round(1000 * t, 1),
        "online_slowdown": round((s + t) / s, 2),
        "cache_once_s": round(t / args.batch * args.clips * args.positions, 1),
        "cache_once_in_student_epochs": round(t / args.batch * args.clips * args.positions / (s * 963 * 2 / 64), 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
