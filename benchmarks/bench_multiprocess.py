# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Training throughput, 1 process vs 2 processes (DDP on gloo, CPU), same global batch and same total threads.

    python benchmarks/bench_multiprocess.py                      # small size: < 3 min on this 2-core machine
    python benchmarks/bench_multiprocess.py --steps 40 --global_batch 32 --max_length 64 --use_peft

Trains the real all-MiniLM-L6-v2 early-exit classifier (offline wheel) with `DepthStopTrainer` on the tweet set, with
the project's default loss, for `--steps` optimizer steps at `--global_batch` examples per step:
- `1 proc`: `python <this file> --worker`, per-device batch = global batch, torch threads = `--threads` (default 2);
- `2 procs`: `accelerate launch --multi_gpu --num_processes 2 <this file> --worker` (2 CPU ranks on gloo), per-device
  batch = global batch / 2, torch threads = `--threads` / 2 per process.
Samples/s are measured by a trainer callback from the end of step `--warmup_steps` to the end of training on rank 0
(process start, data loading and the first steps are excluded); wall seconds include everything. Writes
`<output_prefix>.md` and `.json` (default benchmarks/results/multiprocess).
"""

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--warmup_steps", type=int, default=2, help="steps excluded from the samples/s measurement")
    p.add_argument("--global_batch", type=int, default=8, help="examples per optimizer step, over all processes")
    p.add_argument("--max_length", type=int, default=32, help="token truncation length")
    p.add_argument("--threads", type=int, default=2, help="torch threads in total (split over the processes)")
    p.add_argument("--repeats", type=int, default=2, help="runs per setting, alternated; medians reported")
    p.add_argument(
        "--use_peft", action="store_true", help="LoRA (r=8, query/value) + exit heads instead of all weights"
    )
    p.add_argument("--output_prefix", default=os.path.join(HERE, "results", "multiprocess"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result_file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--per_device_batch", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("steps", "global_batch", "max_length", "threads", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.warmup_steps < args.steps:
        raise ValueError(f"--warmup_steps must be in [0, steps), got {args.warmup_steps} with steps={args.steps}")
    if args.global_batch % 2:
        raise ValueError(f"--global_batch must be even (split over 2 processes), got {args.global_batch}")
    if args.threads % 2:
        raise ValueError(f"--threads must be even (split over 2 processes), got {args.threads}")
    return args


def worker(args):
    import torch
    from accelerate import PartialState
    from transformers import AutoTokenizer, DataCollatorWithPadding, TrainerCallback

    from hf_depthstop import DepthStopBertForSequenceClassification, DepthStopTrainer, DepthStopTrainingArguments
    from hf_depthstop.data import load_tweet_sentiment, minilm_checkpoint_path, tokenize_for_classification
    from hf_depthstop.peft_utils import PeftArguments, apply_peft

    state = PartialState()
    torch.set_num_threads(max(1, args.threads // state.num_processes))

    class Clock(TrainerCallback):
        def __init__(self):
            self.start = self.end = self.threads = None

        def on_step_end(self, a, s, control, **kwargs):
            if s.global_step == args.warmup_steps:
                self.start = time.perf_counter()
            self.end = time.perf_counter()
            self.threads = torch.get_num_threads()  # as training ran

    path = minilm_checkpoint_path()
    n = args.steps * args.global_batch
    data = load_tweet_sentiment(n, 10, 10, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = tokenize_for_classification(data, tokenizer, max_length=args.max_length)["train"]
    torch.manual_seed(0)
    model = DepthStopBertForSequenceClassification.from_pretrained(path, num_labels=3, exit_head_hidden_size=384)
    model = apply_peft(model, PeftArguments(use_peft=args.use_peft))
    targs = DepthStopTrainingArguments(
        os.path.join("/tmp", "bench_multiprocess"),
        per_device_train_batch_size=args.per_device_batch,
        max_steps=args.steps,
        learning_rate=5e-5,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        logging_steps=10**6,
        dataloader_drop_last=True,
    )
    clock = Clock()
    trainer = DepthStopTrainer(
        model=model,
        args=targs,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[clock],
    )
    torch.set_num_threads(max(1, args.threads // state.num_processes))  # again: the Accelerator may reset it
    trainer.train()
    if state.is_main_process:
        measured = args.steps - args.warmup_steps
        seconds = clock.end - clock.start
        with open(args.result_file, "w") as f:
            json.dump(
                {
                    "processes": state.num_processes,
                    "distributed_type": str(state.distributed_type),
                    "threads_per_process": clock.threads,
                    "per_device_batch": args.per_device_batch,
                    "global_batch": args.per_device_batch * state.num_processes,
                    "measured_steps": measured,
                    "measured_seconds": seconds,
                    "samples_per_second": measured * args.per_device_batch * state.num_processes / seconds,
                    "trainer_samples_per_second": trainer.state.log_history[-1].get("train_samples_per_second"),
                },
                f,
            )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, processes: int, result_file: str) -> dict:
    common = [
        "--worker",
        "--result_file",
        result_file,
        "--per_device_batch",
        str(args.global_batch // processes),
        "--steps",
        str(args.steps),
        "--warmup_steps",
        str(args.warmup_steps),
        "--max_length",
        str(args.max_length),
        "--threads",
        str(args.threads),
    ] + (["--use_peft"] if args.use_peft else [])
    if processes == 1:
        cmd = [sys.executable, os.path.abspath(__file__), *common]
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            os.path.abspath(__file__),
            *common,
        ]
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS=str(max(1, args.threads // processes)),
    )
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{processes}-process run failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(result_file) as f:
        result = json.load(f)
    result["wall_seconds"] = wall
    return result


def main(argv=None):
    args = parse(argv)
    if args.worker:
        return worker(args)
    import torch
    import transformers

    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    load_start = os.getloadavg()
    results = {}
    runs = {"1_proc": [], "2_proc": []}
    for _ in range(args.repeats):  # alternated, so both settings see the same machine load on average
        for processes in (1, 2):
            tmp = f"/tmp/bench_multiprocess_{os.getpid()}_{processes}.json"
            runs[f"{processes}_proc"].append(run(args, processes, tmp))
            os.remove(tmp)
    load_end = os.getloadavg()
    for key, rs in runs.items():
        results[key] = dict(
            rs[0],
            samples_per_second=statistics.median(r["samples_per_second"] for r in rs),
            wall_seconds=statistics.median(r["wall_seconds"] for r in rs),
            samples_per_second_runs=[round(r["samples_per_second"], 2) for r in rs],
        )
    one, two = results["1_proc"], results["2_proc"]
    speedup = two["samples_per_second"] / one["samples_per_second"]
    command = "python benchmarks/bench_multiprocess.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    meta = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in load_end],
        "model": "all-MiniLM-L6-v2 early exit (6 exits, dense+tanh heads of width 384)",
        "use_peft": args.use_peft,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "global_batch": args.global_batch,
        "max_length": args.max_length,
        "threads_total": args.threads,
        "repeats": args.repeats,
    }
    with open(args.output_prefix + ".json", "w") as f:
        json.dump({"meta": meta, "results": results, "speedup_2_vs_1": speedup}, f, indent=2)
    busy = max(load_start[0], load_end[0]) > 0.5 * (os.cpu_count() or 1)
    lines = [
        "# Training throughput: 1 process vs 2 processes (DDP, gloo, CPU)",
        "",
        f"- command: `{command}`",
        f"- date: {meta['date']}",
        f"- torch {meta['torch']}, transformers {meta['transformers']}, {meta['cpus']} CPUs; load average at start / "
        f"end: {meta['load_average_start']} / {meta['load_average_end']}"
        + (" (**busy machine: numbers are noisy**)" if busy else ""),
        f"- {meta['model']}, {'LoRA r=8 on query/value + exit heads' if args.use_peft else 'all weights trained'}; "
        f"tweets, max_length {args.max_length}; {args.steps} steps at global batch {args.global_batch}; samples/s "
        f"measured after step {args.warmup_steps} on rank 0 (start-up excluded); wall = whole command; "
        f"{args.repeats} alternated runs per setting",
        "",
        "| setting | processes x threads | per-device batch | samples/s (median) | samples/s per run | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in (("1_proc", "`python`"), ("2_proc", "`accelerate launch --multi_gpu --num_processes 2`")):
        r = results[key]
        lines.append(
            f"| {label} | {r['processes']} x {r['threads_per_process']} | {r['per_device_batch']} | "
            f"{r['samples_per_second']:.1f} | {', '.join(f'{x:.1f}' for x in r['samples_per_second_runs'])} | "
            f"{r['wall_seconds']:.1f} |"
        )
    lines += [
        "",
        f"2-process / 1-process throughput: **{speedup:.2f}x** (same global batch, same total threads, "
        "medians of alternated runs; a shared machine makes single runs noisy). Both runs share the same cores; the "
        "2-process run adds one gradient all-reduce (gloo) per step. What the 2-process path must give, identical "
        "replicas and reduced metrics, is checked by tests/test_distributed.py.",
        "",
    ]
    with open(args.output_prefix + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
