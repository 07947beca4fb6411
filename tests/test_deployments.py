"""Prefect deployments of every flow: typed parameters, schedules from config, and the
work-pool path (`distill deploy` + `prefect worker start`) against a real server."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from distillflow.config import ConfigError, load_config, parse_config
from distillflow.flows.deployments import STAGE_FORMS, STAGE_KEYS, run_stage, runner_deployments
from tests.conftest import free_port
from tests.openai_server import FaultyOpenAIServer, ServerThread
from tests.prefect_processes import (
    api,
    base_env,
    flow_run_logs,
    processes,
    start_server,
    wait_for_deployment,
    wait_for_flow_run,
)
from tests.test_build import API_KEY, GOOD, write_config, write_seeds

ROOT = Path(__file__).resolve().parents[1]


def demo_config(tmp_path: Path, schedule: dict | None = None) -> Path:
    data = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    if schedule is not None:
        data["schedule"] = schedule
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_stage_of_a_config_is_a_deployment_with_a_typed_config_form(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the demo config's relative seed path
    deployments = runner_deployments([demo_config(tmp_path)])
    names = [f"{d.flow_name}/{d.name}" for d in deployments]
    assert names == [
        "build-dataset/demo",
        "distill-capture-logits/demo",
        "distill-train/demo",
        "distill-eval/demo",
        "distill-sweep/demo",
        "distill-mine/demo",
        "distill-run/demo",
    ]
    for deployment in deployments:
        schema = deployment._parameter_openapi_schema.model_dump()
        assert schema["required"] == ["config"], deployment.flow_name
        # The form: the config's sections as typed fields, with their descriptions.
        if deployment.flow_name == "build-dataset":  # only what a build reads
            config_schema = schema["definitions"]["BuildConfig"]
            assert set(config_schema["properties"]) == {
                "name", "output_dir", "license", "seeds", "prompts", "teacher", "chat_template", "chat_template_stop",
                "filters", "dataset",
            }
            assert "prompt_column" not in schema["properties"]
        else:  # only what the stage reads (test_each_stage_form_carries_what_its_stage_reads)
            config_schema = schema["definitions"][STAGE_FORMS[deployment.tags[1]].__name__]
            assert set(config_schema["properties"]) == set(STAGE_KEYS[deployment.tags[1]])
        assert config_schema["additionalProperties"] is False
        assert deployment.parameters["config"]["teacher"]["base_url"] is None  # the local teacher reads none
        if "prompts" in config_schema["properties"]:  # choices are offered, ranges checked by the server
            prompts = schema["definitions"]["PromptsSection"]["properties"]
            assert {"type": "integer", "minimum": 1} in prompts["num_prompts"]["anyOf"] and prompts["num_prompts"]["description"]
            assert prompts["strategies"]["propertyNames"]["enum"] == ["seed", "edge_case", "adversarial", "evolve", "self_instruct"]
        if "training" in config_schema["properties"]:
            training = schema["definitions"]["PipelineTrainingConfig"]["properties"]
            assert "kd_greybox" in training["objective"]["enum"], training["objective"]
        assert deployment.parameters["config"]["name"] == "demo"
        assert deployment.schedules == [] or deployment.schedules is None


def test_a_config_with_only_a_dataset_has_build_and_run(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:3])
    deployments = runner_deployments([write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", "http://127.0.0.1:9/v1")])
    assert [d.flow_name for d in deployments] == ["build-dataset", "distill-run"]


def test_schedules_come_from_the_config_per_deployment(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    schedule = {
        "build": {"cron": "0 3 * * *", "timezone": "Europe/Berlin"},
        "train": {"interval_s": 3600, "active": False},
    }
    deployments = {d.flow_name: d for d in runner_deployments([demo_config(tmp_path, schedule)])}
    (build,) = deployments["build-dataset"].schedules
    assert build.schedule.cron == "0 3 * * *" and build.schedule.timezone == "Europe/Berlin" and build.active
    (train,) = deployments["distill-train"].schedules
    assert train.schedule.interval.total_seconds() == 3600 and not train.active
    assert not deployments["distill-eval"].schedules


@pytest.mark.parametrize(
    "schedule, message",
    [
        ({"build": {"cron": "61 * * * *"}}, "schedule.build.cron: Value error, '61 * * * *' is not a cron expression"),
        ({"build": {"cron": "0 3 * * *", "timezone": "Berlin"}}, "did you mean Europe/Berlin"),
        ({"build": {"timezone": "UTC"}}, "schedule.build: Value error, give exactly one of `cron` or `interval_s`"),
        ({"build": {"cron": "0 3 * * *", "interval_s": 60}}, "give exactly one of `cron` or `interval_s`"),
        ({"biuld": {"interval_s": 60}}, "schedule.biuld: unknown key"),
        ({"build": {"interval_s": 0}}, "schedule.build.interval_s"),
    ],
)
def test_a_bad_schedule_names_the_key_and_the_fix(tmp_path, schedule, message):
    data = yaml.safe_load((ROOT / "configs" / "openai_api.yaml").read_text())
    data["schedule"] = schedule
    with pytest.raises(ConfigError) as error:
        parse_config(data, "c.yaml")
    assert message in str(error.value)


def test_a_schedule_for_a_missing_stage_is_refused(tmp_path):
    data = yaml.safe_load((ROOT / "configs" / "openai_api.yaml").read_text())
    data["schedule"] = {"train": {"cron": "0 3 * * *"}}
    with pytest.raises(ConfigError, match="schedule.train: this config has no `training:` section"):
        parse_config(data, "c.yaml")


@pytest.mark.parametrize("name", sorted(path.name for path in (ROOT / "configs").glob("*.yaml")))
def test_each_stage_form_carries_what_its_stage_reads(name, monkeypatch):
    """A stage deployment's form holds the sections its stage reads, and its run hands them to
    the stage's command as a YAML file that reads back the same (derived keys derive again)."""
    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "configs" / name, check_files=False)
    for deployment in runner_deployments([ROOT / "configs" / name]):
        stage = deployment.tags[1]
        form = STAGE_FORMS[stage].model_validate(deployment.parameters["config"])
        assert set(deployment.parameters["config"]) <= set(STAGE_KEYS[stage]), stage
        assert "schedule" not in deployment.parameters["config"]
        if stage == "build":
            continue  # its run builds (test_the_build_deployment_builds_from_its_form)
        seen = run_stage(lambda path: load_config(path, check_files=False), form, deployment.flow_name)
        for key in STAGE_KEYS[stage]:
            if stage == "capture" and key == "training":  # the held-out share derives from evaluation,
                ignored = {"holdout_fraction"}  # which a capture neither reads nor carries
                assert seen.training.model_dump(exclude=ignored) == config.training.model_dump(exclude=ignored)
                continue
            if key == "teacher" and config.teacher.backend == "local":  # base_url: read by no stage here
                assert seen.teacher.model_dump(exclude={"base_url"}) == config.teacher.model_dump(exclude={"base_url"})
                continue
            assert getattr(seen, key) == getattr(config, key), (stage, key)


def test_a_stage_form_leaves_out_what_its_stage_never_reads(monkeypatch):
    monkeypatch.chdir(ROOT)
    forms = {d.tags[1]: d.parameters["config"] for d in runner_deployments([ROOT / "configs" / "demo.yaml"])}
    assert not {"seeds", "prompts", "filters", "dataset", "sweep", "mining", "schedule"} & set(forms["train"])
    assert not {"seeds", "prompts", "filters", "evaluation", "sweep", "mining"} & set(forms["capture"])
    assert "seeds" in forms["run"] and "schedule" not in forms["run"]


def test_a_cross_section_rule_fails_a_stage_run_before_it_starts(prefect_harness, monkeypatch):
    """Capture and training must cut answers at one max_length: a form edited to break that
    fails with the rule's paragraph and runs nothing."""
    from distillflow.flows.deployments import capture_deployment

    monkeypatch.chdir(ROOT)
    (capture,) = [d for d in runner_deployments([ROOT / "configs" / "demo.yaml"]) if d.tags[1] == "capture"]
    form = json.loads(json.dumps(capture.parameters["config"]))
    form["capture"]["max_length"] = 64
    state = capture_deployment(form, return_state=True)
    assert state.is_failed()
    assert "capture.max_length (64) differs from training.max_length" in state.message


def test_the_key_is_never_a_parameter(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:3])
    deployments = runner_deployments([write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", "http://127.0.0.1:9/v1")])
    for deployment in deployments:
        text = json.dumps(deployment.parameters)
        assert API_KEY not in text and '"api_key_env": "DISTILL_TEST_KEY"' in text


def test_deploy_without_a_server_says_how_to_point_at_one(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from distillflow.flows.deployments import deploy_command

    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:3])
    config = write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", "http://127.0.0.1:9/v1")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    # No server configured, even when another test of this session started a temporary one.
    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(ConfigError, match="set PREFECT_API_URL"):
        deploy_command([config])


@pytest.mark.parametrize("command", ["deploy", "serve"])
def test_deploy_or_serve_to_a_server_that_does_not_answer_names_it(tmp_path, command):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from distillflow.flows.deployments import deploy_command, serve_command

    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:3])
    config = write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", "http://127.0.0.1:9/v1")
    dead = f"http://127.0.0.1:{free_port()}/api"
    run = deploy_command if command == "deploy" else serve_command
    with temporary_settings(updates={PREFECT_API_URL: dead}), pytest.raises(ConfigError, match="does not answer") as error:
        run([config])
    assert str(error.value).startswith(f"distill {command}: the Prefect server") and dead in str(error.value)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_process_worker_runs_a_deployed_build(tmp_path):
    """`distill deploy` to a process pool, `prefect worker start` picks the run up, the
    dataset is written (the way the compose worker runs flows)."""
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:6])
    workdir = tmp_path / "work"
    workdir.mkdir()
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), free_port()) as teacher, processes(tmp_path / "logs") as group:
        # A relative output_dir: it resolves in the deploy's working directory, as on the command line.
        write_config(workdir / "c.yaml", seeds, Path("data/test-build"), teacher.base_url)
        url = start_server(group, tmp_path / "server-home", free_port())
        env = base_env(tmp_path / "client-home", PREFECT_API_URL=url)
        deploy = group.start("deploy", [sys.executable, "-m", "distillflow.cli", "deploy", "c.yaml", "--pool", "distillflow"], env, cwd=workdir, service=False)
        assert deploy.wait(60) == 0, group.log("deploy")
        assert "deployed build-dataset/test-build → work pool 'distillflow'" in group.log("deploy")
        worker_env = {**env, "DISTILL_TEST_KEY": API_KEY, "PREFECT_WORKER_QUERY_SECONDS": "1"}
        group.start("worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", "distillflow", "--type", "process"], worker_env, cwd=tmp_path)

        deployment = wait_for_deployment(url, "build-dataset/test-build", 10, group)
        assert deployment.work_pool_name == "distillflow"
        parameters = {"config": {**deployment.parameters["config"], "name": "from-the-pool"}}
        with api(url) as client:
            run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        run = wait_for_flow_run(url, run.id, 120, group)
        assert run.state.type.value == "COMPLETED", flow_run_logs(url, run.id) + group.log("worker")
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        with api(url) as client:
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        summary = {artifact.key: artifact.data for artifact in artifacts}["from-the-pool-summary"]
        assert summary.startswith("# from-the-pool: 6 accepted, 0 rejected") and "data:image/png;base64," in summary

    manifest = json.loads((workdir / "data" / "test-build" / "manifest.json").read_text())
    assert manifest["name"] == "from-the-pool"  # the edited parameter reached the flow
    assert manifest["counts"]["accepted"] == 6


def test_a_stage_deployment_runs_the_stage_on_its_typed_config(prefect_harness, tmp_path, monkeypatch):
    """What a stage deployment's run does: the config parameter (as edited in the form) is
    written to a YAML file for the stage's command, and the stage runs as a subflow."""
    from distillflow.flows.deployments import run_deployment

    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    # The run's temporary directory goes under this test's own, so a deployment another test
    # runs at the same time (another xdist worker) does not show up in the check below.
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:4])
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), free_port()) as teacher:
        config = load_config(write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", teacher.base_url))
        form = {key: value for key, value in config.model_dump(mode="json").items() if key in STAGE_KEYS["run"]}
        result = run_deployment(form | {"name": "edited-in-the-form"})
    assert result["dataset"]["accepted"] == 4
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["name"] == "edited-in-the-form"
    assert not list(private_tmp.glob("distill-deployment-*"))  # the temporary config is gone


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, field",
    [
        (lambda config: config["prompts"].update(num_prompts=-5), "config.prompts.num_prompts"),
        (lambda config: config["prompts"]["strategies"].update(nope=1.0), "config.prompts.strategies"),
        (lambda config: config["prompts"]["strategies"].update(seed=-1.0), "config.prompts.strategies"),
        (lambda config: config["prompts"].update(domains=["cooking"]), "config.prompts.domains"),
    ],
)
def test_the_server_refuses_a_run_with_a_bad_form_value(prefect_harness, monkeypatch, change, field):
    """What the Run form sends is checked by the server against the config's schema: a bad value
    is refused (409, naming the field) and no run is created."""
    import copy

    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    monkeypatch.chdir(ROOT)
    deployment = runner_deployments([ROOT / "configs" / "demo.yaml"])[0]
    deployment_id = deployment.apply()
    config = copy.deepcopy(deployment.parameters["config"])
    change(config)
    with get_client(sync_client=True) as client:
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(deployment_id, parameters={"config": config})
        assert refused.value.response.status_code == 409
        assert field in refused.value.response.json()["detail"]
        assert client.create_flow_run_from_deployment(deployment_id, parameters=deployment.parameters).id


def test_the_build_deployment_builds_from_its_form(prefect_harness, tmp_path, monkeypatch):
    """The build form holds only the build's keys; its run checks them as a whole config and builds."""
    from distillflow.flows.deployments import BUILD_KEYS, build_deployment

    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:4])
    with ServerThread(FaultyOpenAIServer(api_key=API_KEY), free_port()) as teacher:
        config = load_config(write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", teacher.base_url))
        form = {key: value for key, value in config.model_dump(mode="json").items() if key in BUILD_KEYS}
        result = build_deployment(form | {"name": "edited-in-the-form"})
    assert result["counts"]["accepted"] == 4
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["name"] == "edited-in-the-form"


def test_deploy_and_serve_never_take_over_each_others_deployments(prefect_harness, tmp_path, monkeypatch):
    """A name that `distill serve` holds is refused by `distill deploy` (and the other way
    round, and for another pool) with the fix; --replace takes it over; redeploying to the
    same pool is an update."""
    from distillflow.flows.deployments import deploy_command, refuse_takeover

    monkeypatch.setenv("DISTILL_TEST_KEY", API_KEY)
    monkeypatch.chdir(tmp_path)
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, GOOD[:3])
    config = write_config(tmp_path / "c.yaml", seeds, tmp_path / "out", "http://127.0.0.1:9/v1")
    data = yaml.safe_load(config.read_text())
    data["name"] = "takeover-probe"
    config.write_text(yaml.safe_dump(data))
    for deployment in runner_deployments([config]):
        deployment.apply()  # as `distill serve` registers them: no work pool

    with pytest.raises(ConfigError) as refused:
        deploy_command([config], pool="takeover-a")
    message = str(refused.value)
    assert "build-dataset/takeover-probe is served by `distill serve`" in message
    assert "on work pool 'takeover-a'" in message and "--replace" in message and "`name:`" in message

    assert "build-dataset/takeover-probe" in deploy_command([config], pool="takeover-a", replace=True)
    assert deploy_command([config], pool="takeover-a")  # the same pool again: an update
    with pytest.raises(ConfigError, match="is on work pool 'takeover-a'"):
        deploy_command([config], pool="takeover-b")
    with pytest.raises(ConfigError, match="registering it served by `distill serve`"):
        refuse_takeover(runner_deployments([config]), None)  # what `distill serve` checks first


def test_a_config_without_seeds_serves_its_model_stages_and_a_build_names_the_key(tmp_path, monkeypatch):
    """A config that only captures, trains and evaluates needs no seeds: it gets no build or run
    deployment, and `distill build` on it names the missing key and the fix."""
    from distillflow.flows.build import build_command

    monkeypatch.chdir(ROOT)
    data = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    del data["seeds"]
    path = tmp_path / "no-seeds.yaml"
    path.write_text(yaml.safe_dump(data))
    stages = [deployment.tags[1] for deployment in runner_deployments([path])]
    assert stages == ["capture", "train", "eval", "sweep", "mine"]
    with pytest.raises(ConfigError, match=r"seeds: no seed file given; .*add `seeds: \[\{path: "):
        build_command(path)
