"""`distill eval`: models right and wrong by construction, the report recomputed from the
records, robustness perturbations, the held-out split, the judge, the config, end to end."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from distillflow.cli import app
from distillflow.config import ConfigError, parse_config
from distillflow.records import content_id
from distillflow.training.scratch import build_tiny_llama
from distillflow.storage.dataset import is_heldout
from distillflow.tasks.evaluation.config import RobustnessConfig
from distillflow.tasks.evaluation.evaluate import (
    EvalItem,
    build_report,
    combine_verdicts,
    evaluate_model,
    judge_models,
    load_eval_run,
    parse_verdict,
    perturb_items,
    prepare_items,
)
from tests.openai_server import FaultyOpenAIServer, ServerThread

API_KEY = "eval-test-key"
WORDS = ["plimo", "drask", "velun", "quorb", "mintaf", "zeph"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_dataset(directory: Path, count: int = 60) -> list[dict]:
    """A minimal built dataset: data/part-00000.parquet with id, prompt, response."""
    rows = []
    for index in range(count):
        prompt = f"What is the first letter of \"{WORDS[index % len(WORDS)]}{index}\"?"
        rows.append({"id": content_id(prompt), "prompt": prompt, "response": WORDS[index % len(WORDS)][0]})
    (directory / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), directory / "data" / "part-00000.parquet")
    return rows


def skill_rows(say: str | None = None) -> list[dict]:
    """Eval rows whose argument is protected; with `say`, the test server answers `say`
    (right or wrong by construction) and the marker is protected too."""
    rows = []
    for word in WORDS:
        marker = f"[[say:{say if say is not None else word[0]}]] "
        rows.append(
            {
                "prompt": f'{marker}What is the first letter of "{word}"?',
                "reference": word[0],
                "check": "exact",
                "protect": [marker.strip(), word],
            }
        )
    return rows


def endpoint_config(tmp_path: Path, base_url: str, eval_sets: list[dict], **evaluation) -> Path:
    config = {
        "evaluation": {
            "output_dir": str(tmp_path / "eval"),
            "models": [{"name": "endpoint", "base_url": base_url, "model": "test-teacher", "api_key_env": "EVAL_KEY"}],
            "eval_sets": eval_sets,
            "robustness": {"perturbations": ["typo", "whitespace", "casing", "distractor"], "seed": 3},
            **evaluation,
        }
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run_endpoint(path: Path) -> tuple[list[dict], dict]:
    run = load_eval_run(path)
    prepared = prepare_items(run)
    result = evaluate_model(run, run.config.models[0], prepared.items)
    return result["records"], build_report(run, result["records"], [result["info"]])


@pytest.fixture
def server(port, monkeypatch):
    monkeypatch.setenv("EVAL_KEY", API_KEY)
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), port) as running:
        yield running


def test_right_by_construction_is_100_and_wrong_is_0(server, tmp_path):
    right = write_jsonl(tmp_path / "right.jsonl", skill_rows())
    wrong = write_jsonl(tmp_path / "wrong.jsonl", skill_rows(say="zz"))
    path = endpoint_config(tmp_path, server.base_url, [{"path": str(right)}, {"path": str(wrong)}])
    records, report = run_endpoint(path)
    accuracy = report["models"]["endpoint"]["accuracy"]
    assert accuracy["per_eval_set"]["right"] == {"accuracy": 1.0, "correct": 6, "total": 6}
    assert accuracy["per_eval_set"]["wrong"] == {"accuracy": 0.0, "correct": 0, "total": 6}
    robustness = report["models"]["endpoint"]["robustness"]
    for name, entry in robustness["per_perturbation"].items():
        # Protected marker and word survive every perturbation: right stays right, wrong stays wrong.
        assert entry["accuracy"] == 0.5 and entry["gap"] == 0.0, name
    perturbed = [r for r in records if r["perturbation"] != "clean"]
    assert len(perturbed) == 4 * 12
    assert all(r["latency_s"] is not None and not r["from_ledger"] for r in records)

    # A rerun pays for nothing: every answer comes from the eval's endpoint ledger.
    sent = server.server.total_requests
    records_again, report_again = run_endpoint(path)
    assert server.server.total_requests == sent
    assert all(r["from_ledger"] for r in records_again)
    assert report_again["models"]["endpoint"]["accuracy"] == accuracy


def recompute(records: list[dict]) -> dict:
    """The report's figures computed again, independently, from the per-prompt records."""
    out: dict = defaultdict(dict)
    by_model: dict = defaultdict(list)
    for record in records:
        by_model[record["model"]].append(record)
    for model, rows in by_model.items():
        clean = [r for r in rows if r["perturbation"] == "clean" and r["eval_set"] != "heldout" and r["correct"] is not None]
        out[model]["clean"] = sum(r["correct"] for r in clean) / len(clean)
        perturbed = [r for r in rows if r["perturbation"] != "clean" and r["correct"] is not None]
        if perturbed:
            out[model]["robust"] = sum(r["correct"] for r in perturbed) / len(perturbed)
            for name in {r["perturbation"] for r in perturbed}:
                some = [r for r in perturbed if r["perturbation"] == name]
                out[model][name] = sum(r["correct"] for r in some) / len(some)
        heldout = [r for r in rows if r["eval_set"] == "heldout"]
        if heldout:
            out[model]["agreement"] = sum(r["answer"].strip() == r["reference"].strip() for r in heldout) / len(heldout)
            out[model]["f1"] = sum(r["token_f1"] for r in heldout) / len(heldout)
            if "nll" in heldout[0]:
                out[model]["ppl"] = math.exp(sum(r["nll"] for r in heldout) / sum(r["target_tokens"] for r in heldout))
    return out


def test_perturbations_keep_protected_spans_and_are_seeded():
    items = [
        EvalItem("s", "clean", 0, f"s:{i}", f'Give the last letter of the word "{w}", please.', w[-1], "exact", (w,))
        for i, w in enumerate(WORDS)
    ]
    names = ["typo", "char_noise", "casing", "whitespace", "word_swap", "distractor", "unicode"]
    first, skipped = perturb_items(items, RobustnessConfig(perturbations=names, seed=1, per_prompt=2))
    again, _ = perturb_items(items, RobustnessConfig(perturbations=names, seed=1, per_prompt=2))
    other, _ = perturb_items(items, RobustnessConfig(perturbations=names, seed=2, per_prompt=2))
    assert first == again
    assert [i.prompt for i in first] != [i.prompt for i in other]
    assert len(first) + sum(skipped.values()) == len(names) * len(items) * 2
    for item in first:
        assert item.protect[0] in item.prompt, (item.perturbation, item.prompt)
        assert item.reference == item.protect[0][-1]
    changed = sum(item.prompt != items[int(item.prompt_id.split(":")[1])].prompt for item in first)
    assert changed >= 0.9 * len(first)


def test_heldout_split_is_stable_and_training_skips_it(tmp_path):
    ids = [content_id(f"prompt {i}") for i in range(2000)]
    split = [is_heldout(row_id, 0.1) for row_id in ids]
    assert split == [is_heldout(row_id, 0.1) for row_id in ids]
    assert 150 < sum(split) < 250
    # Growing the fraction only adds rows.
    assert all(is_heldout(row_id, 0.3) for row_id, held in zip(ids, split) if held)
    assert not any(is_heldout(row_id, 0.0) for row_id in ids)

    from transformers import AutoTokenizer

    from distillflow.training.data import tokenize_dataset

    rows = write_dataset(tmp_path / "ds", count=60)
    model_dir = tmp_path / "tok"
    build_tiny_llama(model_dir, hidden_size=32, num_heads=1, num_layers=1)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    every = tokenize_dataset(tmp_path / "ds", tokenizer, None, 128, tmp_path / "cache")
    kept = tokenize_dataset(tmp_path / "ds", tokenizer, None, 128, tmp_path / "cache", holdout_fraction=0.3)
    held = [row for row in rows if is_heldout(row["id"], 0.3)]
    assert 0 < len(held) < len(rows)
    assert len(every) == len(rows) and len(kept) == len(rows) - len(held)


BASE_CONFIG = {
    "name": "t",
    "output_dir": "data/t",
    "seeds": [{"path": "seeds.jsonl"}],
    "teacher": {"backend": "openai", "model": "m", "api_key_env": None},
}


def test_training_holds_out_what_evaluation_holds_out():
    training = {"dataset_dir": "data/t", "output_dir": "runs/t", "student": "s"}
    evaluation = {"output_dir": "e", "models": [{"name": "s", "path": "s"}], "heldout": {"fraction": 0.2}}
    config = parse_config({**BASE_CONFIG, "training": training, "evaluation": evaluation})
    assert config.training.holdout_fraction == 0.2
    assert parse_config({**BASE_CONFIG, "training": training}).training.holdout_fraction is None
    with pytest.raises(ConfigError, match=r"training.holdout_fraction.*evaluation.heldout.fraction"):
        parse_config({**BASE_CONFIG, "training": {**training, "holdout_fraction": 0.1}, "evaluation": evaluation})


def test_the_training_process_reads_the_same_holdout(tmp_path):
    from distillflow.config import load_training_config

    training = {"dataset_dir": "data/t", "output_dir": "runs/t", "student": "s"}
    evaluation = {"output_dir": "e", "models": [{"name": "s", "path": "s"}], "heldout": {"fraction": 0.25}}
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump({**BASE_CONFIG, "training": training, "evaluation": evaluation}))
    assert load_training_config(path).holdout_fraction == 0.25


@pytest.mark.parametrize(
    "evaluation",
    [
        {"output_dir": "e", "models": [{"name": "s", "path": "s"}], "eval_sets": [{"path": "x.jsonl"}], "bogus": 1},
        {"output_dir": "e", "models": [{"name": "s", "path": "s", "temperature": 0}], "eval_sets": [{"path": "x.jsonl"}]},
        {"output_dir": "e", "models": [{"name": "s", "path": "s"}], "eval_sets": [{"path": "x.jsonl", "colum": "q"}]},
        {"output_dir": "e", "models": [{"name": "s", "path": "s"}], "heldout": {"fraction": 0.1, "rows": 5}},
        {"output_dir": "e", "models": [{"name": "s", "path": "s"}], "heldout": {}, "robustness": {"sever": 1}},
    ],
)
def test_unknown_keys_under_evaluation_are_errors(evaluation):
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({**BASE_CONFIG, "evaluation": evaluation})


def test_config_errors_name_the_key(tmp_path):
    bad = {"output_dir": "e", "models": [{"name": "s", "path": "s", "base_url": "http://x"}], "heldout": {}}
    with pytest.raises(ConfigError, match="exactly one of"):
        parse_config({**BASE_CONFIG, "evaluation": bad})
    with pytest.raises(ConfigError, match="unknown perturbation"):
        parse_config({**BASE_CONFIG, "evaluation": {**bad, "models": [{"name": "s", "path": "s"}], "robustness": {"perturbations": ["nope"]}}})
    path = tmp_path / "e.yaml"
    heldout = {"dataset_dir": str(tmp_path)}
    path.write_text(yaml.safe_dump({"evaluation": {"output_dir": "e", "models": [{"name": "s", "path": str(tmp_path)}], "heldout": heldout}}))
    with pytest.raises(ConfigError, match=r"evaluation.models.0.path"):
        load_eval_run(path)


def test_the_teacher_is_asked_through_the_builds_ledger(server, tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"prompt": "x"}])
    eval_set = write_jsonl(tmp_path / "set.jsonl", skill_rows())
    config = {
        "name": "t",
        "output_dir": str(tmp_path / "data"),
        "seeds": [{"path": str(seeds)}],
        "teacher": {"backend": "openai", "base_url": server.base_url, "model": "test-teacher", "api_key_env": "EVAL_KEY"},
        "evaluation": {
            "output_dir": str(tmp_path / "eval"),
            "models": [{"name": "teacher", "teacher": True}],
            "eval_sets": [{"path": str(eval_set)}],
            "speed": None,
        },
    }
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(config))
    records, report = run_endpoint(path)
    assert report["models"]["teacher"]["accuracy"]["accuracy"] == 1.0
    assert (tmp_path / "data" / ".ledger" / "teacher.sqlite").is_file()
    sent = server.server.total_requests
    records, _ = run_endpoint(path)
    assert server.server.total_requests == sent and all(r["from_ledger"] for r in records)


def test_judge_both_orders_cached_and_counted(server, tmp_path, monkeypatch):
    # The test server answers the first [[say:X]] in the judge prompt, so an answer holding
    # [[say:A]] against one holding [[say:B]] wins in both orders; equal answers tie, because
    # a judge that always names the same position is cancelled by the swapped order.
    eval_set = write_jsonl(tmp_path / "set.jsonl", [{"prompt": f"q{i}"} for i in range(3)])
    path = endpoint_config(
        tmp_path, server.base_url, [{"path": str(eval_set)}],
        judge={"base_url": server.base_url, "model": "test-teacher", "api_key_env": "EVAL_KEY", "reference_model": "endpoint",
               "price_per_million_prompt_tokens": 1.0, "price_per_million_completion_tokens": 2.0},
        robustness=None,
    )
    run = load_eval_run(path)
    answers = {"student": ["[[say:A]]", "[[say:B]]", "same [[say:A]]"], "endpoint": ["[[say:B]]", "[[say:A]]", "same [[say:A]]"]}
    records = [
        {"model": model, "eval_set": "set", "perturbation": "clean", "prompt_id": f"set:{i}", "prompt": f"q{i}", "answer": text}
        for model, texts in answers.items()
        for i, text in enumerate(texts)
    ]
    judged = judge_models(run, records)
    assert [r["outcome"] for r in judged["records"]] == ["win", "loss", "tie"]
    summary = judged["summary"]
    assert summary["requests"] == 6 and summary["requests_sent"] == 5  # the tie's two orders are one request
    assert summary["estimated_cost_usd"] > 0
    sent = server.server.total_requests
    again = judge_models(run, records)
    assert server.server.total_requests == sent and again["summary"]["ledger_hits"] == 6
    assert again["records"] == judged["records"]

    assert parse_verdict(" b.") == "B" and parse_verdict("Tie") == "TIE" and parse_verdict("maybe") == "invalid"
    assert combine_verdicts("A", "B") == "win" and combine_verdicts("B", "A") == "loss"
    assert combine_verdicts("A", "A") == "tie" and combine_verdicts("TIE", "B") == "win"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-student")
    build_tiny_llama(path, hidden_size=32, num_heads=1, num_layers=1, seed=0)
    return path


def test_distill_eval_end_to_end_in_process(prefect_harness, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "data", count=40)
    rows = skill_rows()
    for index, row in enumerate(rows):  # two families; the second's questions have several right answers
        row["family"] = "first_letter" if index % 2 == 0 else "any_letter"
        if index % 2:
            row.update(check="one_of", reference="|".join(sorted(set(row["protect"][1]))))
    write_jsonl(tmp_path / "set.jsonl", rows)
    config = {
        "output_dir": "data",
        "teacher": {"backend": "local", "model": str(tiny_model), "device": "cpu"},
        "evaluation": {
            "output_dir": "eval",
            "models": [{"name": "tiny", "path": str(tiny_model)}, {"name": "teacher", "teacher": True}],
            "eval_sets": [{"path": "set.jsonl", "name": "skills", "limit": 4}],
            "heldout": {"fraction": 0.5, "max_rows": 6},
            "robustness": {"perturbations": ["typo", "distractor"]},
            "speed": {"batch_sizes": [1, 4], "prompts": 4, "max_new_tokens": 3, "warmup": 1, "repeats": 2},
            "generation": {"max_tokens": 4, "device": "cpu"},
            "spread": {"samples": 3},
        },
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["eval", "eval.yaml"])
    assert result.exit_code == 0, result.output
    assert "tok/s@1" in result.output and "teacher" in result.output
    for name in ("records.jsonl", "report.json", "report.md", "chart.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "eval" / "records.jsonl").read_text().splitlines()]
    assert len(records) == 2 * (4 + 2 * 4 + 6)
    expected = recompute(records)
    for model in ("tiny", "teacher"):
        entry = report["models"][model]
        assert math.isclose(entry["accuracy"]["accuracy"], expected[model]["clean"])
        assert math.isclose(entry["robustness"]["robust_accuracy"], expected[model]["robust"])
        for name in ("typo", "distractor"):
            assert math.isclose(entry["robustness"]["per_perturbation"][name]["accuracy"], expected[model][name])
        assert math.isclose(entry["heldout"]["exact"], expected[model]["agreement"])
        assert math.isclose(entry["heldout"]["token_f1"], expected[model]["f1"])
        assert math.isclose(entry["heldout"]["perplexity"], expected[model]["ppl"])
        assert entry["parameters"] > 0 and entry["size_mb"] > 0 and entry["peak_memory_mb"] is not None
        assert math.isclose(entry["weights_memory_mb"] * 2**20, 4 * entry["parameters"], rel_tol=0.01)  # float32
        assert set(entry["speed"]) == {"1", "4"} and entry["speed"]["1"]["tokens_per_s"] > 0
        assert entry["speed"]["1"]["rounds"] == 2 and len(entry["speed"]["4"]["tokens_per_s_by_round"]) == 2
        clean = [r for r in records if r["model"] == model and r["eval_set"] == "skills" and r["perturbation"] == "clean"]
        for family in ("first_letter", "any_letter"):
            own = [r for r in clean if r["family"] == family]
            assert entry["accuracy"]["per_family"][family]["total"] == len(own) == 2
            assert entry["accuracy"]["per_family"][family]["correct"] == sum(r["correct"] for r in own)
        spread = entry["spread"]["any_letter"]
        assert spread["prompts"] == 2 and spread["samples_per_prompt"] == 3
        assert 0.0 <= spread["validity"] <= 1.0 and 0.0 <= spread["spread"] <= 1.0
    assert "Accuracy per family" in (tmp_path / "eval" / "report.md").read_text()
    rows = {row["model"]: row for row in report["table"]}
    assert report["reference_model"] == "teacher" and rows["teacher"]["speedup_vs_teacher"] == 1.0
    # The same weights, greedy: the local teacher and the student answer alike.
    answers = defaultdict(list)
    for record in records:
        answers[record["model"]].append(record["answer"])
    assert answers["tiny"] == answers["teacher"]


def test_cli_errors_are_one_paragraph(tmp_path):
    (tmp_path / "none.yaml").write_text(yaml.safe_dump({"output_dir": "x"}))
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "none.yaml")])
    assert result.exit_code == 1 and "no `evaluation:` section" in result.output
    bad = {"evaluation": {"output_dir": "e", "models": [{"name": "s", "path": "s"}], "heldout": {}, "extra": 1}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 1 and "evaluation.extra: unknown key" in result.output


def test_distill_run_ends_with_eval_and_pays_nothing_twice(prefect_harness, server, tmp_path, monkeypatch):
    import distillflow.storage.seeds as seeds_module
    from distillflow.flows.pipeline import run_command
    from tests.test_build import GOOD, write_config, write_seeds

    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    reads = []
    read_seed_source = seeds_module.read_seed_source
    monkeypatch.setattr(seeds_module, "read_seed_source", lambda *a: reads.append(a) or read_seed_source(*a))
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD)
    path = write_config(tmp_path / "config.yaml", seeds, tmp_path / "data", server.base_url)
    config = yaml.safe_load(path.read_text())
    config["evaluation"] = {
        "output_dir": str(tmp_path / "eval"),
        "models": [{"name": "teacher", "teacher": True}],
        "heldout": {"fraction": 0.5},
        "speed": None,
    }
    path.write_text(yaml.safe_dump(config))
    result = run_command(path)
    assert len(reads) == 1  # the seed file is read once: for the checks, then by the build
    (row,) = result["evaluation"]
    assert row["model"] == "teacher" and row["agreement"] == 1.0
    records = [json.loads(line) for line in (tmp_path / "eval" / "records.jsonl").read_text().splitlines()]
    # The held-out prompts are the build's: every teacher answer came from the build's ledger.
    assert records and all(r["from_ledger"] and r["eval_set"] == "heldout" for r in records)
    assert sum(server.server.answered.values()) == len(GOOD)


def test_a_missing_endpoint_key_is_named_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("EVAL_KEY", raising=False)
    eval_set = write_jsonl(tmp_path / "set.jsonl", skill_rows())
    path = endpoint_config(tmp_path, "http://127.0.0.1:9/v1", [{"path": str(eval_set)}])
    with pytest.raises(ConfigError, match=r"evaluation.models.0.api_key_env: environment variable EVAL_KEY is not set"):
        load_eval_run(path)


def test_an_endpoint_that_never_answers_is_an_error_not_zero_accuracy(tmp_path, monkeypatch):
    from distillflow.tasks.teacher import TeacherFatalError

    monkeypatch.setenv("EVAL_KEY", API_KEY)
    many = write_jsonl(tmp_path / "many.jsonl", skill_rows())
    path = endpoint_config(tmp_path, "http://127.0.0.1:9/v1", [{"path": str(many)}], robustness=None)
    with pytest.raises(TeacherFatalError, match="teacher_error:connection"):  # the client's first-contact stop
        run_endpoint(path)
    # a single prompt never reaches the client's second probe: the eval itself refuses a 0 % row
    one = write_jsonl(tmp_path / "one.jsonl", skill_rows()[:1])
    path = endpoint_config(tmp_path, "http://127.0.0.1:9/v1", [{"path": str(one)}], robustness=None)
    with pytest.raises(TeacherFatalError, match="answered none of its 1 prompts.*teacher_error:connection"):
        run_endpoint(path)
