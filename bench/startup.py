"""Fixed start-up of `distill` commands: wall time from the shell to exit, before and after.

Each side is a whole `distill` process as a user runs it, with no Prefect server configured
or running (no PREFECT_API_URL, nothing recorded by `distill server start`):

  build   `distill build CONFIG`: 10 prompts against a local OpenAI-compatible server
          (tests/openai_server.py, 50 ms per answer), a fresh output directory each run
  config  `distill config CONFIG` (loads and checks the config)
  help    `distill --help`
  floor   `python -c "import prefect"`: the interpreter and Prefect's import, nothing else

The commands that load a model are timed on the after side to the moment their first model
is loaded (transformers' "Loading weights" line), against a bare script that imports torch
and transformers (and DeepSpeed, for train) and loads the same model (the floor of any
process that runs it):

  train   `distill train`: sft, the demo teacher's derived student, 1 step, on the build's
          rows; also the time to "launching training" (the command's own part: after it,
          the trainer process imports torch and DeepSpeed)
  eval    `distill eval`: the demo teacher on 4 held-out questions
  capture `distill capture-logits`: the demo teacher's top-8 of the build's rows
  inspect `distill inspect DIR` (no model: wall time)

With no server, a command runs its flows without orchestration (distillflow/runs.py); after
the rounds, "after" builds again on Prefect's temporary server (DISTILL_ORCHESTRATION=prefect,
what every command paid before) and with a lasting server (`distill server start` once,
`distill server stop` at the end), as a user who keeps one running gets.

"before" is the code at `--baseline` (default: the last commit that ran every command on
Prefect's temporary server),
extracted with `git archive` and put first on PYTHONPATH; "after" is this checkout. Each
side has its own PREFECT_HOME, warmed by one untimed build (the database is created once,
as on a user's machine). Rounds alternate before/after so a drift of the machine's speed
hits both; each figure is the median over the rounds.

    python bench/startup.py [--rounds 3] [--baseline b00bcd8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from teacher_throughput import API_KEY, free_port, wait_http, write_build_config  # noqa: E402

BASELINE = "b00bcd8"  # the last commit whose commands all ran on Prefect's temporary server
PACKAGE_DIRS = {"flows": "flows", "tasks": "tasks", "prompts": "prompts", "training": "training",
                "storage": "storage", "configs": "configs"}
COMMAND_TIMEOUT_S = 300
TEACHER = ROOT / "distillflow" / "assets" / "demo-teacher"
EVAL_SET = ROOT / "prompts" / "seeds" / "skills_eval.jsonl"
WEIGHTS_LOADED = "Loading weights"
REPORT = ROOT / "runs" / "bench-startup" / "startup.json"


def baseline_tree(commit: str, workdir: Path) -> Path:
    """The package as it was at `commit`, laid out as installed (distillflow.flows, …), in a
    directory to put first on PYTHONPATH."""
    source = workdir / "baseline-src"
    source.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True,
                             timeout=120).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True, timeout=120)
    for name, folder in PACKAGE_DIRS.items():
        (source / "distillflow" / name).symlink_to(source / folder, target_is_directory=True)
    site = workdir / "baseline-site"
    site.mkdir()
    (site / "distillflow").symlink_to(source / "distillflow", target_is_directory=True)
    return site


def side_env(workdir: Path, side: str, pythonpath: Path | None) -> dict[str, str]:
    env = {**os.environ, "BENCH_API_KEY": API_KEY, "PREFECT_HOME": str(workdir / f"prefect-{side}"),
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def timed(command: list[str], env: dict[str, str], cwd: Path) -> float:
    """Wall seconds of one process, from start to exit; fails loudly on a non-zero exit."""
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-2000:]}\n"
                           f"{result.stderr[-4000:]}")
    return elapsed


def timed_lines(command: list[str], env: dict[str, str], cwd: Path, markers: dict[str, str]) -> dict[str, float]:
    """Seconds from start to the first output line holding each marker (stdout and stderr),
    and to exit ("total"); fails loudly on a non-zero exit or a marker never printed."""
    started = time.perf_counter()
    seen: dict[str, float] = {}
    tail: list[str] = []
    with subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        watchdog = threading.Timer(COMMAND_TIMEOUT_S, process.kill)  # a command that hangs ends the read
        watchdog.start()
        try:
            assert process.stdout is not None
            for line in process.stdout:
                now = time.perf_counter() - started
                tail = [*tail[-40:], line]
                for name, marker in markers.items():
                    if name not in seen and marker in line:
                        seen[name] = now
            code = process.wait(COMMAND_TIMEOUT_S)
        finally:
            watchdog.cancel()
    seen["total"] = time.perf_counter() - started
    missing = [name for name in markers if name not in seen]
    if code != 0 or missing:
        raise RuntimeError(f"{' '.join(command)} exited {code}; markers not seen: {missing}\n{''.join(tail)}")
    return seen


def model_config(run_dir: Path, dataset_dir: Path) -> Path:
    """capture, training and evaluation sections on the demo teacher, over `dataset_dir`."""
    import yaml

    config = yaml.safe_load((dataset_dir.parent / "config.yaml").read_text())
    config["output_dir"] = str(dataset_dir)
    config["capture"] = {"source": "local", "model": str(TEACHER), "k": 8, "batch_size": 16,
                         "output_dir": str(run_dir / "captured")}
    config["training"] = {
        "dataset_dir": str(dataset_dir), "output_dir": str(run_dir / "student"), "teacher": str(TEACHER),
        "derive_student": yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["training"]["derive_student"],
        "objective": "sft", "max_length": 256, "micro_batch_size": 2, "max_steps": 1,
    }
    config["evaluation"] = {
        "output_dir": str(run_dir / "eval"), "models": [{"name": "teacher", "path": str(TEACHER)}],
        "eval_sets": [{"name": "held-out", "path": str(EVAL_SET), "limit": 4}],
        "robustness": {"perturbations": []}, "speed": {"batch_sizes": [1], "prompts": 2, "max_new_tokens": 4},
    }
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def leftover_prefect_servers(home: Path) -> list[str]:
    """Processes still running with this PREFECT_HOME in their environment (none expected)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"PREFECT_HOME={home}".encode() in environ.split(b"\0"):
            found.append(proc.name)
    return found


def versions() -> str:
    from provenance import versions as package_versions  # bench/provenance.py, beside this script

    return package_versions((
        "prefect", "openai", "httpx", "httpx2", "aiohttp", "typer", "numba", "datasets", "torch", "transformers", "deepspeed"
    ))


def table(report: dict) -> str:
    """The start-up table of docs/benchmarks.md, from a report of this script."""
    median = statistics.median

    def runs(values: list[float]) -> str:
        return ", ".join(f"{value:.2f}" for value in values)

    before, after = report["before"], report["after"]
    build = f"`distill build`, {report['prompts']} prompts"
    rows = [
        "| command | before (every command on Prefect's temporary server) | after | after/before |",
        "|---|---:|---:|---:|",
        f"| {build}, no server | {median(before['build']):.2f} s ({runs(before['build'])}) | "
        f"**{median(after['build']):.2f} s** ({runs(after['build'])}) | {median(after['build']) / median(before['build']):.2f} |",
        f"| {build}, `DISTILL_ORCHESTRATION=prefect` (temporary server) | | {median(report['temporary_server']):.2f} s "
        f"({runs(report['temporary_server'])}) | |",
        f"| {build}, `distill server start` once first | | {median(report['lasting_server']):.2f} s "
        f"({runs(report['lasting_server'])}) | |",
        f"| `distill config FILE` | {median(before['config']):.2f} s | {median(after['config']):.2f} s | "
        f"{median(after['config']) / median(before['config']):.2f} |",
        f"| `distill --help` | {median(before['help']):.2f} s | {median(after['help']):.2f} s | "
        f"{median(after['help']) / median(before['help']):.2f} |",
        f"| `python -c \"import prefect\"` (floor) | | {median(report['import_prefect']):.2f} s | |",
    ]
    models = f"\n\n{model_table(report)}" if "model_commands" in report else ""
    return "\n".join(rows) + models + (
        f"\n\n`{report['command']}`, baseline `{report['baseline']}`, {report['rounds']} rounds, medians; "
        f"{report['versions']}; {report['cpus']} CPUs, load average {report['load_average']} at the end. "
        f"Processes left behind: {report.get('left_behind_before', '?')} (before), "
        f"{report.get('left_behind_after', '?')} (after)."
    )


def model_table(report: dict) -> str:
    """The table of the commands that load a model, from a report of this script."""
    median = statistics.median
    bare = median(report["bare_model_load"])
    bare_deepspeed = median(report["bare_deepspeed_model_load"])
    labels = {"train": "`distill train` (sft, 1 step)", "eval": "`distill eval` (4 questions)",
              "capture": "`distill capture-logits`", "inspect": "`distill inspect DIR`"}
    rows = ["| command (no server) | to the first model loaded | of which over a bare load | to exit |",
            "|---|---:|---:|---:|"]
    for name, label in labels.items():
        runs = report["model_commands"][name]
        total = median(run["total"] for run in runs)
        if "loaded" not in runs[0]:
            rows.append(f"| {label} | | | {total:.2f} s |")
            continue
        loaded = median(run["loaded"] for run in runs)
        floor = bare_deepspeed if name == "train" else bare  # the trainer process runs DeepSpeed
        rows.append(f"| {label} | {loaded:.2f} s | **{loaded - floor:.2f} s** | {total:.2f} s |")
        if name == "train":
            launching = median(run["launching"] for run in runs)
            rows.append(f"| ↳ its own part, to \"launching training\" | {launching:.2f} s | | |")
    rows.append(f"| bare script: `import torch, transformers` and load the same model | {bare:.2f} s | | |")
    rows.append(f"| the same with `import deepspeed` (the floor of `distill train`) | {bare_deepspeed:.2f} s | | |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE, help="commit measured as 'before'")
    parser.add_argument("--prompts", type=int, default=10)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="distill-startup-"))
    teacher_port = free_port()
    teacher = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "openai_server.py"), "--port", str(teacher_port),
         "--api-key", API_KEY, "--latency-ms", "50", "--no-record"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{teacher_port}/health")
        base_url = f"http://127.0.0.1:{teacher_port}/v1"
        sides = {"before": side_env(workdir, "before", baseline_tree(args.baseline, workdir)),
                 "after": side_env(workdir, "after", None)}
        distill = [sys.executable, "-m", "distillflow.cli"]
        runs = 0

        def build(side: str, **extra_env: str) -> float:
            nonlocal runs
            runs += 1
            run_dir = workdir / f"run-{runs}"
            run_dir.mkdir()
            config = write_build_config(run_dir, base_url, args.prompts, concurrency=64, name="startup")
            return timed([*distill, "build", str(config)], {**sides[side], **extra_env}, run_dir)

        config_dir = workdir / "config-only"
        config_dir.mkdir()
        config = write_build_config(config_dir, base_url, args.prompts, concurrency=64, name="startup")
        commands = {
            "build": build,
            "config": lambda side: timed([*distill, "config", str(config)], sides[side], workdir),
            "help": lambda side: timed([*distill, "--help"], sides[side], workdir),
        }
        print(f"python bench/startup.py {' '.join(sys.argv[1:])}".rstrip())
        print(f"{versions()}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; "
              f"baseline {args.baseline}; {args.rounds} round(s)")
        for side in sides:  # warm-up: creates each side's Prefect database, fills the OS file cache
            build(side)
        times: dict[tuple[str, str], list[float]] = {}
        floor: list[float] = []
        for round_index in range(args.rounds):
            order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
            for name, run in commands.items():
                for side in order:
                    times.setdefault((name, side), []).append(run(side))
            floor.append(timed([sys.executable, "-c", "import prefect"], sides["after"], workdir))

        # The commands that load a model, after side only, against a bare script's load.
        model_dir = workdir / "models"
        model_dir.mkdir()
        dataset = write_build_config(model_dir, base_url, args.prompts, concurrency=64, name="startup").parent / "out"
        timed([*distill, "build", str(model_dir / "config.yaml")], sides["after"], model_dir)
        loaded = {"loaded": WEIGHTS_LOADED}
        model_times: dict[str, list[dict[str, float]]] = {}
        bare: list[float] = []
        bare_deepspeed: list[float] = []  # the floor of a DeepSpeed trainer process
        for round_index in range(args.rounds):
            run_dir = model_dir / f"round-{round_index}"
            run_dir.mkdir()
            config = str(model_config(run_dir, dataset))
            for name, command, markers in (
                ("train", ["train", config], {"launching": "launching training", **loaded}),
                ("eval", ["eval", config], loaded),
                ("capture", ["capture-logits", config], loaded),
                ("inspect", ["inspect", str(dataset)], {}),
            ):
                model_times.setdefault(name, []).append(timed_lines([*distill, *command], sides["after"], run_dir, markers))
            for modules, times_of in (("torch, transformers", bare), ("torch, transformers, deepspeed", bare_deepspeed)):
                times_of.append(timed_lines(
                    [sys.executable, "-c", f"import {modules}; "
                     f"transformers.AutoModelForCausalLM.from_pretrained({str(TEACHER)!r})"],
                    {**sides["after"], "DS_ACCELERATOR": "cpu"}, run_dir, loaded)["loaded"])

        # The after side on Prefect's temporary server, as every command ran before.
        temporary = [build("after", DISTILL_ORCHESTRATION="prefect") for _ in range(args.rounds)]

        # The after side with a lasting server: `distill server start` once, then the same builds.
        started = subprocess.run([*distill, "server", "start", "--port", str(free_port())], env=sides["after"],
                                 cwd=workdir, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        if started.returncode != 0:
            raise RuntimeError(f"distill server start failed:\n{started.stderr[-4000:]}")
        try:
            build("after")  # warm-up: the lasting server's first flow run
            with_server = [build("after") for _ in range(args.rounds)]
        finally:
            subprocess.run([*distill, "server", "stop"], env=sides["after"], cwd=workdir, capture_output=True,
                           timeout=COMMAND_TIMEOUT_S)

        report = {
            "command": f"python bench/startup.py {' '.join(sys.argv[1:])}".rstrip(),
            "versions": versions(), "cpus": os.cpu_count(), "load_average": round(os.getloadavg()[0], 1),
            "baseline": args.baseline, "rounds": args.rounds, "prompts": args.prompts,
            "before": {name: times[(name, "before")] for name in commands},
            "after": {name: times[(name, "after")] for name in commands},
            "temporary_server": temporary, "lasting_server": with_server, "import_prefect": floor,
            "model_commands": model_times, "bare_model_load": bare,
            "bare_deepspeed_model_load": bare_deepspeed,
        }
        labels = {"build": f"distill build ({args.prompts} prompts, no server)", "config": "distill config FILE",
                  "help": "distill --help"}
        print(f"{'command':<40} {'before':>9} {'after':>9} {'after/before':>13}   (median wall s; all runs)")
        for name, label in labels.items():
            before, after = times[(name, "before")], times[(name, "after")]
            print(f"{label:<40} {statistics.median(before):9.2f} {statistics.median(after):9.2f} "
                  f"{statistics.median(after) / statistics.median(before):13.2f}   "
                  f"before {', '.join(f'{t:.2f}' for t in before)}; after {', '.join(f'{t:.2f}' for t in after)}")
        label = f"distill build ({args.prompts} prompts, temporary server)"
        print(f"{label:<40} {'':>9} {statistics.median(temporary):9.2f} {'':>13}   "
              f"after {', '.join(f'{t:.2f}' for t in temporary)}   (DISTILL_ORCHESTRATION=prefect)")
        label = f"distill build ({args.prompts} prompts, distill server start)"
        print(f"{label:<40} {'':>9} {statistics.median(with_server):9.2f} {'':>13}   "
              f"after {', '.join(f'{t:.2f}' for t in with_server)}")
        floor_label = 'python -c "import prefect" (floor)'
        print(f"{floor_label:<40} {'':>9} {statistics.median(floor):9.2f}")
        print(model_table(report))
        time.sleep(1.0)
        for side in sides:
            left = leftover_prefect_servers(workdir / f"prefect-{side}")
            report[f"left_behind_{side}"] = len(left)
            print(f"processes left behind ({side}): {len(left)}" + (f" (pids {', '.join(left)})" if left else ""))
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {REPORT.relative_to(ROOT)} (scripts/render_tables.py --save puts it into docs/benchmarks.md)")
    finally:
        teacher.terminate()
        teacher.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
