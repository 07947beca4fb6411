"""`distill sweep`: plan the points of a `sweep:` grid, keep each point's state on disk, rank
the finished points and write sweep.json / sweep.md / sweep.png / best.yaml.

A point is one set of training settings. Its directory `points/<name>/` holds the full
config it runs (`config.yaml`), the training run (`train/`), its evaluation (`eval/`) and
`point.json`, written after every stage: the keys of what was trained and evaluated (a
digest of the settings and of the data), the figures, and the error of a failed attempt.
A rerun trusts a stage whose key matches; a point whose settings or data changed starts
from scratch (its old checkpoints belong to other settings); a point that crashed is
trained again with `resume: true`, so DeepSpeed continues from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from distillflow.config import ConfigError, DistillConfig, format_validation_error
from distillflow.storage.atomic import atomic_path, write_json_atomic, write_text_atomic
from distillflow.tasks.sweep.config import LOWER_IS_BETTER, SweepConfig, expand_points, point_training_data
from distillflow.training.config import TrainingConfig

# Training keys that change how a run is logged or launched, not what it learns.
NOT_IN_TRAIN_KEY = frozenset(
    {"output_dir", "log_every", "checkpoint_every", "keep_checkpoints", "num_processes", "master_port", "resume", "tokenized_cache_dir"}
)
# Short names of derive_student keys, for point names.
DERIVE_ABBREVIATIONS = {
    "num_layers": "L",
    "layer_stride": "stride",
    "hidden_size": "h",
    "intermediate_size": "i",
    "num_attention_heads": "heads",
}
REFERENCE_DIR = "reference"
FINISHED = ("done", "reused")  # a point's status once trained and evaluated (now, or by an earlier run)


@dataclass
class SweepPoint:
    """One point: its settings, where it runs, and the full config it runs with."""

    name: str
    settings: dict[str, Any]
    directory: Path
    config: dict[str, Any]  # a full distillflow config (training + evaluation of this point)
    train_key: str
    eval_key: str

    @property
    def config_path(self) -> Path:
        return self.directory / "config.yaml"

    @property
    def state_path(self) -> Path:
        return self.directory / "point.json"

    @property
    def train_dir(self) -> Path:
        return self.directory / "train"

    @property
    def eval_dir(self) -> Path:
        return self.directory / "eval"


@dataclass
class SweepPlan:
    sweep: SweepConfig
    points: list[SweepPoint]
    reference: SweepPoint | None  # the eval of the reference model (teacher), once per sweep
    data_fingerprint: str
    source: str = "<config>"
    keys: list[str] = field(default_factory=list)  # the grid's keys (and the points'), in order


# -- points ---------------------------------------------------------------------------------


def _value_label(key: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        if key == "derive_student":
            return "-".join(f"{DERIVE_ABBREVIATIONS.get(k, k)}{_value_label(k, v)}" for k, v in value.items() if v is not None)
        return "-".join(f"{k}{_value_label(k, v)}" for k, v in value.items())
    if key in ("student", "teacher", "deepspeed_config", "teacher_deepspeed_config"):  # a path: its name
        path = Path(str(value))
        return path.parent.name if path.name == "final" else path.name
    return str(value)


def point_name(settings: dict[str, Any]) -> str:
    """`temperature=2_alpha=0.5`: readable, safe as a directory name, unique per settings."""
    text = "_".join(f"{key}={_value_label(key, value)}" for key, value in settings.items()) or "base"
    safe = "".join(char if char.isalnum() or char in "._=-" else "-" for char in text)
    if len(safe) > 80:  # long names (many keys, long paths) keep a readable head and a digest
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
        safe = f"{safe[:70]}-{digest}"
    return safe


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def point_training(base: TrainingConfig, settings: dict[str, Any], where: str) -> TrainingConfig:
    """The base `training:` section with the point's settings; errors name the point and key."""
    try:
        return TrainingConfig.model_validate(point_training_data(base, settings))
    except ValidationError as error:
        raise ConfigError(format_validation_error(where, error, section="training")) from None


def _evaluation_of(config: DistillConfig, models: list[dict[str, Any]], output_dir: Path, reference: str | None) -> dict[str, Any]:
    evaluation = config.evaluation.model_dump(mode="json")  # type: ignore[union-attr]
    evaluation.update(models=models, output_dir=str(output_dir), reference_model=reference)
    return evaluation


def plan_sweep(config: DistillConfig, source: str = "<config>") -> SweepPlan:
    """Validate the sweep against the config and lay out every point; nothing runs."""
    from distillflow.training.data import data_fingerprint

    sweep = config.sweep
    if sweep is None:
        raise ConfigError(f"{source}: no `sweep:` section; add one (see docs/sweep.md)")
    # training, evaluation and what the metric needs are there: checked when the config loaded
    assert config.training is not None and config.evaluation is not None
    dataset_dir = Path(config.training.dataset_dir)
    if not (dataset_dir / "data").is_dir():
        raise ConfigError(
            f"{source}: training.dataset_dir {dataset_dir} has no data/; build the dataset first "
            f"(distill build {source}, and distill capture-logits for kd_topk)"
        )
    fingerprint = data_fingerprint(dataset_dir)
    root = Path(sweep.output_dir)
    base = config.model_dump(mode="json", exclude={"sweep", "mining"})

    evaluation = config.evaluation
    reference_name = evaluation.baseline_name
    reference_entry = next((m for m in evaluation.models if m.name == reference_name), None)
    reference_models = [reference_entry.model_dump(mode="json", exclude_none=True)] if reference_entry else []

    points: list[SweepPoint] = []
    names: dict[str, int] = {}
    for index, settings in enumerate(expand_points(sweep)):
        name = point_name(settings)
        if name in names:  # two settings that print alike (e.g. 1 and 1.0) stay apart
            name = f"{name}-{index}"
        names[name] = index
        directory = root / "points" / name
        training = point_training(config.training, settings, f"{source}: sweep point {name}")
        training.output_dir = directory / "train"
        training.tokenized_cache_dir = root / "tokenized"  # one tokenisation for every point
        student = {"name": name, "path": str(directory / "train" / "final")}
        judge = evaluation.judge is not None
        models = [student] + (reference_models if judge else [])
        point_config = {
            **base,
            "training": training.model_dump(mode="json"),
            "evaluation": _evaluation_of(config, models, directory / "eval", reference_name if judge else None),
        }
        train_key = digest(
            {
                "training": {k: v for k, v in point_config["training"].items() if k not in NOT_IN_TRAIN_KEY},
                "data": fingerprint,
            }
        )
        eval_key = digest({"train": train_key, "evaluation": {**point_config["evaluation"], "output_dir": None}})
        points.append(SweepPoint(name, settings, directory, point_config, train_key, eval_key))

    reference = None
    if reference_models:
        directory = root / REFERENCE_DIR
        reference_config = {**base, "evaluation": _evaluation_of(config, reference_models, directory / "eval", reference_name)}
        reference_config.pop("training", None)
        key = digest({"evaluation": {**reference_config["evaluation"], "output_dir": None}, "data": fingerprint})
        reference = SweepPoint(reference_name or "reference", {}, directory, reference_config, "", key)
    keys = list(dict.fromkeys([*sweep.grid, *(k for point in sweep.points for k in point)]))
    return SweepPlan(sweep, points, reference, fingerprint, source, keys)


# -- state on disk --------------------------------------------------------------------------


def read_state(point: SweepPoint) -> dict[str, Any]:
    if not point.state_path.is_file():
        return {}
    try:
        return json.loads(point.state_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}  # a torn write: the stages are redone (training resumes from its checkpoint)


def write_state(point: SweepPoint, state: dict[str, Any]) -> None:
    write_json_atomic(point.state_path, state)


def training_done(point: SweepPoint, state: dict[str, Any]) -> bool:
    return state.get("train_key") == point.train_key and state.get("train") is not None and (point.train_dir / "final" / "config.json").is_file()


def eval_done(point: SweepPoint, state: dict[str, Any]) -> bool:
    return training_done(point, state) and state.get("eval_key") == point.eval_key and state.get("row") is not None


def prepare_point(point: SweepPoint) -> dict[str, Any]:
    """Make the point's directory ready to run; returns its state (emptied when stale).

    Settings or data that changed since the directory was written make its training
    stale: the old run (checkpoints included) is removed, so nothing resumes from it.
    """
    state = read_state(point)
    if state and state.get("train_key") != point.train_key:
        shutil.rmtree(point.train_dir, ignore_errors=True)
        shutil.rmtree(point.eval_dir, ignore_errors=True)
        state = {}
    point.directory.mkdir(parents=True, exist_ok=True)
    import yaml

    write_text_atomic(point.config_path, yaml.safe_dump(point.config, sort_keys=False))
    state.update(name=point.name, settings=point.settings, train_key=point.train_key)
    write_state(point, state)
    return state


# -- results --------------------------------------------------------------------------------


def point_row(name: str, report: dict[str, Any]) -> dict[str, Any]:
    """The point's figures from its eval report (its own row of the comparison table)."""
    row = next(row for row in report["table"] if row["model"] == name)
    judge = (report["models"][name].get("judge") or {}).get("win_rate")
    return {**row, "judge_win_rate": judge}


def metric_value(result: dict[str, Any], metric: str) -> float | None:
    value = (result.get("row") or {}).get(metric)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def rank_points(results: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Finished points best first by `metric` (ties keep grid order), then unscored and failed points."""
    sign = 1 if metric in LOWER_IS_BETTER else -1
    scored = [r for r in results if r.get("status") in FINISHED and metric_value(r, metric) is not None]
    rest = [r for r in results if r not in scored]
    ranked = sorted(scored, key=lambda r: sign * metric_value(r, metric))  # stable: grid order on ties
    for rank, result in enumerate(ranked, start=1):
        result["rank"] = rank
    for result in rest:
        result["rank"] = None
    return ranked + rest


SWEEP_COLUMNS = (
    ("clean_acc", "clean acc"),
    ("robust_acc", "robust acc"),
    ("gap", "gap"),
    ("agreement", "agreement"),
    ("judge_win_rate", "judge"),
    ("tok_s_at_1", "tok/s@1"),
    ("speedup", "speed-up"),
    ("params", "params"),
    ("final_loss", "loss"),
)


def _cell(key: str, value: Any) -> str:
    from distillflow.tasks.evaluation.report import _format

    if value is None:
        return "–"
    if key == "judge_win_rate":
        return f"{100 * value:.1f}%"
    if key == "speedup":
        return f"{value:.2f}x"
    if key == "final_loss":
        return f"{value:.4g}"
    return _format(key, value)


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the ranked table: rank, point, its settings, the figures, status."""
    keys = summary["keys"]
    header = ["rank", "point", *keys, *(title for _, title in SWEEP_COLUMNS), "status"]
    cells = []
    for result in summary["points"]:
        row = {**(result.get("row") or {}), "final_loss": (result.get("train") or {}).get("final_loss"), "speedup": result.get("speedup")}
        status = result["status"] if result["status"] != "failed" else f"failed: {short_error(result.get('error'))}"
        cells.append(
            [
                str(result["rank"]) if result.get("rank") else "–",
                result["name"],
                *(_value_label(key, result["settings"][key]) if key in result["settings"] else "–" for key in keys),
                *(_cell(key, row.get(key)) for key, _ in SWEEP_COLUMNS),
                status,
            ]
        )
    return header, cells


def short_error(error: str | None, limit: int = 100) -> str:
    """The last line of an error (a failed training quotes its output; the cause is last)."""
    lines = [line.strip(" |") for line in (error or "").splitlines() if line.strip(" |")]
    text = lines[-1] if lines else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_sweep_table(summary: dict[str, Any]) -> str:
    header, cells = table_rows(summary)
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in [header, *cells]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def sweep_markdown(summary: dict[str, Any]) -> str:
    from distillflow.tasks.evaluation.report import markdown_table

    header, cells = table_rows(summary)
    reference = summary.get("reference")
    lines = [
        f"# Sweep: {len(summary['points'])} points, ranked by {summary['metric']}",
        "",
        markdown_table(header, cells),
        "",
    ]
    if reference:
        row = reference["row"]
        lines.append(
            f"Reference model `{reference['name']}`: clean {_cell('clean_acc', row.get('clean_acc'))}, robust "
            f"{_cell('robust_acc', row.get('robust_acc'))}, {_cell('tok_s_at_1', row.get('tok_s_at_1'))} tok/s at batch 1 "
            "(the speed-up column is relative to it)."
        )
        lines.append("")
    best = summary.get("best")
    if best:
        lines.append(f"Best: `{best['name']}` ({summary['metric']} {_cell(summary['metric'], best['value'])}); its config: `best.yaml`.")
        lines.append("")
    timing = summary["timing"]
    lines.append(
        f"Wall time {timing['wall_s']:.0f} s: training {timing['train_s']:.0f} s, answering and timing in eval "
        f"{timing['eval_model_s']:.0f} s, everything else (Prefect bookkeeping, eval set-up, reports) "
        f"{timing['overhead_s']:.0f} s = {100 * timing['overhead_share']:.1f}%; {timing['points_run']} point(s) run now, "
        f"{timing['points_reused']} reused from an earlier run."
    )
    failed = [r for r in summary["points"] if r["status"] == "failed"]
    for result in failed:
        lines += ["", f"Failed `{result['name']}` after {result.get('attempts') or 1} attempt(s):", "", "```", str(result.get("error")), "```"]
    lines += ["", "![sweep](sweep.png)", ""]
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both x and y (higher is better on both)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((ox >= x and oy >= y) and (ox > x or oy > y) for j, (ox, oy) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def write_sweep_chart(summary: dict[str, Any], path: Path) -> None:
    """Left: the metric against the first numeric key, one line per value of the other keys.
    Right: the metric against tokens/s at batch 1 with the accuracy–speed front."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = summary["metric"]
    done = [r for r in summary["points"] if r["status"] in FINISHED and metric_value(r, metric) is not None]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    numeric = [
        key
        for key in summary["keys"]
        if done and all(isinstance(r["settings"].get(key), int | float) and not isinstance(r["settings"].get(key), bool) for r in done)
    ]
    if numeric:
        x_key = numeric[0]
        others = [k for k in summary["keys"] if k != x_key]
        groups: dict[str, list[tuple[float, float]]] = {}

        def other_values(result: dict[str, Any]) -> tuple:
            return tuple((0, v) if isinstance(v, int | float) else (1, str(v)) for v in (result["settings"].get(k) for k in others))

        for result in sorted(done, key=other_values):  # legend in the order of the values
            label = ", ".join(f"{k}={_value_label(k, result['settings'].get(k))}" for k in others) or metric
            groups.setdefault(label, []).append((float(result["settings"][x_key]), float(metric_value(result, metric))))
        for label, values in groups.items():
            values.sort()
            left.plot([v[0] for v in values], [v[1] for v in values], marker="o", label=label)
        left.set_xlabel(x_key)
        xs = sorted({v[0] for values in groups.values() for v in values})
        if len(xs) > 2 and xs[0] > 0 and xs[-1] / xs[0] >= 4:  # e.g. temperatures 1, 2, 4: even steps
            left.set_xscale("log")
            left.minorticks_off()
        left.set_xticks(xs)
        left.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        left.legend(fontsize=7)
    else:
        names = [r["name"] for r in done]
        left.barh(names, [metric_value(r, metric) for r in done])
        left.tick_params(axis="y", labelsize=6)
    left.set_ylabel(metric)
    left.set_title(f"{metric} per point")
    speed = [(r, (r.get("row") or {}).get("tok_s_at_1")) for r in done]
    speed = [(r, s) for r, s in speed if s]
    if speed:
        xy = [(float(s), float(metric_value(r, metric))) for r, s in speed]
        right.scatter([p[0] for p in xy], [p[1] for p in xy], color="tab:gray")
        if metric not in LOWER_IS_BETTER:
            front = pareto_front(xy)
            right.plot([xy[i][0] for i in front], [xy[i][1] for i in front], color="tab:red", marker="o", label="front")
            right.legend(fontsize=7)
        for (result, _), (x, y) in zip(speed, xy):
            right.annotate(result["name"], (x, y), fontsize=5)
        right.set_xlabel("tokens/s at batch 1")
        right.set_ylabel(metric)
        right.set_title("accuracy vs speed")
    else:
        right.set_axis_off()
    figure.tight_layout()
    with atomic_path(path, "the chart") as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)


def summarize(plan: SweepPlan, results: list[dict[str, Any]], reference: dict[str, Any] | None, timing: dict[str, Any]) -> dict[str, Any]:
    """sweep.json's content: the ranked points, the best one, the reference row, the timing."""
    metric = plan.sweep.metric
    reference_speed = (reference or {}).get("row", {}).get("tok_s_at_1") if reference else None
    for result in results:
        speed = (result.get("row") or {}).get("tok_s_at_1")
        result["speedup"] = speed / reference_speed if speed and reference_speed else None
    ranked = rank_points(results, metric)
    best = next((r for r in ranked if r.get("rank") == 1), None)
    return {
        "metric": metric,
        "keys": plan.keys,
        "data_fingerprint": plan.data_fingerprint,
        "output_dir": str(plan.sweep.output_dir),
        "points": ranked,
        "best": {"name": best["name"], "settings": best["settings"], "value": metric_value(best, metric), "config": "best.yaml"} if best else None,
        "reference": reference,
        "timing": timing,
    }


def write_sweep_files(plan: SweepPlan, summary: dict[str, Any]) -> None:
    """sweep.md, sweep.png and best.yaml, then sweep.json last (its presence = a complete set)."""
    import yaml

    root = Path(plan.sweep.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    write_sweep_chart(summary, root / "sweep.png")
    write_text_atomic(root / "sweep.md", sweep_markdown(summary))
    best = summary.get("best")
    if best:
        point = next(p for p in plan.points if p.name == best["name"])
        write_text_atomic(root / "best.yaml", yaml.safe_dump(point.config, sort_keys=False))
    write_json_atomic(root / "sweep.json", summary)
