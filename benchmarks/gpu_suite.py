"""Every GPU check in one call: each stage's CUDA path, then every benchmark, JSON to a folder.

A session lent a GPU (see /work/.library/device/README.md in this workplace: 15 minutes
of device time per session, starts included) runs this once, reads, fixes, and runs it
again if time allows. Steps run in order, each as a subprocess with its own cap and never
past the overall `--budget`; a step that would not fit is recorded as skipped, so the
call always ends in time and says what it did not measure:

1. `env`: GPU, driver, torch and CUDA versions, and a bf16 matmul's TFLOP/s.
2. `smoke`: the demo (configs/tiny-cpu.yaml) through `driftlab run --profile gpu`: every
   stage of the pipeline on CUDA, their quality verdicts, and the run's wall time.
3. `bench_train --device cuda` (MFU of grokking's model, gpt2, gpt2-medium in bf16),
   `bench_extract`, `bench_sae` (1024 -> 5120) and `bench_sae --stream`, `bench_ot`
   (against POT's CPU loop), `bench_dynamics`, and `bench_detect` on
   configs/facts-confusable.yaml (the detect stage on CUDA).
4. `grokking`: the p = 113 seeds of configs/grokking.yaml with whatever budget is left
   (`bench_grokking --parallel 3`).

Output (at most two files, as the device returns at most eight): `results.jsonl`, every
JSON line the steps printed, each with its `step`, plus one `{"step": ..., "status": ...,
"seconds": ...}` line per step; `log.txt`, the tail of each step's stderr.

The device has no package registry: its image holds torch, transformers, numpy, scipy,
scikit-learn, matplotlib, jinja2 and rich, and `benchmarks/gpu_wheels.sh` (run here, where
pip works) downloads the rest into `.whl/`, which the call carries and installs first:

    device run, carry [".whl"], command:
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \\
        .whl/*.whl && PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_suite.py --out $OUT

`--device cpu --quick` runs the same sequence with each benchmark's smallest settings on a
CPU, to check the script itself before spending device time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Seconds kept back from the budget for writing the results.
RESERVE = 10.0
#: Characters of each step's stderr kept in log.txt.
LOG_TAIL = 4000


@dataclass
class Suite:
    """The steps' results so far and the time left."""

    out: Path
    budget: float
    start: float = field(default_factory=time.monotonic)
    lines: list[dict[str, Any]] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.budget - RESERVE - (time.monotonic() - self.start)

    def run(self, step: str, argv: list[str], cap: float, need: float = 20.0) -> None:
        """Run `argv` for at most `cap` seconds (less if the budget has less), keeping its
        JSON lines; skipped when fewer than `need` seconds are left."""
        limit = min(cap, self.left())
        if limit < need:
            self.lines.append({"step": step, "status": "skipped", "reason": "budget spent"})
            return
        t0 = time.monotonic()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        try:
            proc = subprocess.run(
                argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit
            )
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            stdout, stderr = proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as err:
            status = f"timed out after {limit:.0f} s"
            stdout = _text(err.stdout)
            stderr = _text(err.stderr)
        for line in stdout.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                self.lines.append({"step": step, **record})
        seconds = round(time.monotonic() - t0, 1)
        self.lines.append({"step": step, "status": status, "seconds": seconds})
        self.logs.append(f"== {step}: {status} in {seconds} s\n{stderr[-LOG_TAIL:]}")
        self.write()

    def write(self) -> None:
        """Results so far: a later step that hangs the machine leaves the earlier ones."""
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / "results.jsonl").open("w") as f:
            for line in self.lines:
                f.write(json.dumps(line) + "\n")
        (self.out / "log.txt").write_text("\n".join(self.logs))


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


ENV_PROBE = """
import json, time, torch
info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                cuda=torch.version.cuda, multiprocessors=props.multi_processor_count)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    info["bf16_matmul_tflops"] = round(10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12, 1)
print(json.dumps(info))
"""


def _smoke_argv(python: str, store: str, device: str) -> list[str]:
    profile = "gpu" if device == "cuda" else "cpu"
    return [python, "-m", "cli", "run", "configs/tiny-cpu.yaml", "--store", store,
            "--profile", profile]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    parser.add_argument("--budget", type=float, default=450.0, help="seconds in all")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="smallest settings (CPU check)")
    parser.add_argument("--skip", nargs="*", default=[], help="steps to leave out")
    args = parser.parse_args(argv)
    suite = Suite(Path(args.out), args.budget)
    py, dev = sys.executable, args.device
    quick = ["--quick"] if args.quick else []
    store = tempfile.mkdtemp(prefix="gpu-suite-")
    steps: list[tuple[str, list[str], float]] = [
        ("env", [py, "-c", ENV_PROBE], 30),
        ("smoke", _smoke_argv(py, f"{store}/smoke", dev), 120),
        ("bench_train", [py, "benchmarks/bench_train.py", "--device", dev], 75),
        ("bench_extract", [py, "benchmarks/bench_extract.py", "--device", dev, *quick], 45),
        ("bench_sae", [py, "benchmarks/bench_sae.py", "--device", dev, *quick], 45),
        ("bench_sae_stream",
         [py, "benchmarks/bench_sae.py", "--stream", "--device", dev, *quick], 60),
        ("bench_ot", [py, "benchmarks/bench_ot.py", "--device", dev, *quick], 60),
        ("bench_dynamics", [py, "benchmarks/bench_dynamics.py", "--device", dev, *quick], 30),
        ("bench_detect",
         [py, "benchmarks/bench_detect.py", "--spec", "configs/facts-confusable.yaml",
          "--device", "auto" if dev == "cuda" else "cpu", "--store", f"{store}/detect"], 120),
        ("grokking",
         [py, "benchmarks/bench_grokking.py", "--store", f"{store}/grokking", "--parallel", "3"],
         float("inf")),
    ]  # fmt: skip
    unknown = sorted(set(args.skip) - {step for step, _, _ in steps})
    if unknown:
        parser.error(f"--skip: no step {', '.join(unknown)}; the steps: "
                     f"{', '.join(step for step, _, _ in steps)}")  # fmt: skip
    for step, command, cap in steps:
        if step in args.skip:
            suite.lines.append({"step": step, "status": "skipped", "reason": "--skip"})
            continue
        suite.run(step, command, cap)
    suite.write()
    print(json.dumps({"steps": [ln for ln in suite.lines if "status" in ln]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
