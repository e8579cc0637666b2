"""Where a training step's time goes on the LLaMA-2-7B shape: torch.profiler over our loop, top ops by GPU and CPU time.

On the GPU machine, after the bundle's two-step start:  . /root/qdev/env.sh && python3 benchmarks/profile_train.py
Writes profile_train.txt under $OUT. BENCH_TINY=1 runs it on a tiny model on the CPU (a smoke test of the script).
Settings: MICRO (sequences per forward, 0 = all 16 at once), CKPT (1 = gradient checkpointing), COMPILE (1 = compile
the decoder layers), STEPS, TOP. The header line gives wall seconds per step; the tables end with the total self
CPU and GPU time, so GPU time over wall time says whether the GPU or the Python side is the bottleneck.
"""

import os
import shutil
from pathlib import Path

import bench_train  # the model shape, data and step settings of the speed benchmark
from torch.profiler import ProfilerActivity, profile, schedule

MICRO = int(os.environ.get("MICRO", "0"))
CKPT = os.environ.get("CKPT", "1") == "1"
COMPILE = os.environ.get("COMPILE", "0") == "1"
STEPS = int(os.environ.get("STEPS", "3"))  # profiled optimizer steps, after bench_train.WARMUP
TOP = int(os.environ.get("TOP", "25"))


def main() -> None:
    from qloraner.config import TrainConfig
    from qloraner.train import train_adapter

    bench_train.make_model()
    cuda = bench_train.DEVICE.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    config = TrainConfig(
        model=str(bench_train.MODEL_DIR),
        output_dir="/tmp/profile-train",
        limit=(STEPS + bench_train.WARMUP) * 16,
        batch_size=16,
        micro_batch_size=MICRO,
        max_steps=STEPS + bench_train.WARMUP,
        lr=bench_train.LR,
        lora_r=64,
        lora_alpha=16,
        lora_dropout=0.1,
        gradient_checkpointing=CKPT,
        compile=COMPILE,
        save_every=0,
        eval_after=False,
        resume=False,
        experiment="profile",
    )
    shutil.rmtree(config.output_dir, ignore_errors=True)
    walls = []

    def on_step(step: int, metrics: dict) -> None:
        walls.append(metrics["step_s"])
        prof.step()

    with profile(
        activities=activities, schedule=schedule(wait=0, warmup=bench_train.WARMUP, active=STEPS, repeat=1)
    ) as prof:
        train_adapter(config, device=bench_train.DEVICE, on_step=on_step)
    wall = sum(walls[bench_train.WARMUP :]) / len(walls[bench_train.WARMUP :])
    averages = prof.key_averages()
    tables = [
        f"# {STEPS} steps, micro-batch {MICRO or 16}, checkpointing {CKPT}, compile {COMPILE}, device {bench_train.DEVICE}, "
        f"{wall:.3f} s per step wall (profiled, {STEPS * wall:.2f} s in all)\n"
    ]
    for key in (["self_device_time_total"] if cuda else []) + ["self_cpu_time_total"]:
        tables.append(f"## by {key}\n" + averages.table(sort_by=key, row_limit=TOP, max_name_column_width=60))
    text = "\n".join(tables)
    (Path(os.environ.get("OUT", "/tmp")) / os.environ.get("PROFILE_TXT", "profile_train.txt")).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
