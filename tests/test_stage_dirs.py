"""Which directory each stage reads: an explicit key wins, else the output of the stage
before it, starting at the config's output_dir, so an edited output_dir carries through."""

from __future__ import annotations

from pathlib import Path

import yaml

from distillflow.config import load_config, load_training_config, parse_config, stage_dirs
from distillflow.flows.deployments import runner_deployments
from distillflow.tasks.capture.logits import resolve_capture_settings

ROOT = Path(__file__).resolve().parents[1]


def demo_data(output_dir: str) -> dict:
    data = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    data["output_dir"] = output_dir
    data["training"].pop("dataset_dir", None)
    data["capture"].pop("input_dir", None)
    data["capture"].pop("output_dir", None)
    data.pop("mining", None)
    return data


def test_an_edited_output_dir_is_what_capture_and_training_read(tmp_path):
    config = parse_config(demo_data(str(tmp_path / "edited")))
    dirs = stage_dirs(config)
    assert dirs.capture_input == dirs.capture_output == dirs.training_dataset == tmp_path / "edited"
    settings = resolve_capture_settings(config)
    assert Path(settings.input_dir) == Path(settings.output_dir) == tmp_path / "edited"
    assert config.training.dataset_dir == tmp_path / "edited"


def test_the_training_stage_reads_the_derived_directory_from_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(demo_data(str(tmp_path / "edited"))))
    assert load_training_config(path).dataset_dir == tmp_path / "edited"


def test_an_explicit_key_wins_and_capture_output_feeds_kd_topk(tmp_path):
    data = demo_data(str(tmp_path / "built"))
    data["capture"]["output_dir"] = str(tmp_path / "captured")
    data["training"].update(objective="kd_topk", temperature=1.0)  # reads the captured tokens
    dirs = stage_dirs(parse_config(data))
    assert (dirs.capture_input, dirs.training_dataset) == (tmp_path / "built", tmp_path / "captured")
    data["training"]["dataset_dir"] = str(tmp_path / "mine")
    data["capture"]["input_dir"] = str(tmp_path / "theirs")
    dirs = stage_dirs(parse_config(data))
    assert (dirs.capture_input, dirs.training_dataset) == (tmp_path / "theirs", tmp_path / "mine")


def test_a_deployment_form_does_not_pin_what_derives(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the demo config's relative seed path
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(demo_data("runs/demo/dataset")))
    full = None
    for deployment in runner_deployments([path]):
        config = deployment.parameters["config"]
        if "training" not in config:  # the build form carries only the keys a build reads
            continue
        assert config["training"]["dataset_dir"] is None, deployment.flow_name
        assert config["capture"]["input_dir"] is None, deployment.flow_name
        full = config
    assert full is not None, "no deployment form carries the training section"
    # What the form sends back with a new output_dir is what the stages then read.
    config = full
    config["output_dir"] = str(tmp_path / "edited")
    assert stage_dirs(load_config_from(config, tmp_path)).training_dataset == tmp_path / "edited"


def load_config_from(data: dict, tmp_path: Path):
    path = tmp_path / "from-form.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, check_files=False)
