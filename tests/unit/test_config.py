from pathlib import Path

import pytest

from visionflow.core.config import ConfigError, config_dir, load_config


def test_default_config_composes_and_is_typed(tmp_path):
    cfg = load_config([f"workdir={tmp_path}"])
    assert cfg.model.name == "simple_cnn" and cfg.data.name == "shapes"
    assert isinstance(cfg.trainer.max_epochs, int)
    assert cfg.storage.root == f"{tmp_path}/artifacts"  # interpolations resolved
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert cfg.run_id  # a fresh id when none is given


def test_overrides_groups_and_experiments(tmp_path):
    cfg = load_config(
        [f"workdir={tmp_path}", "model=resnet18", "trainer.max_epochs=3", "experiment=shapes_tiny"]
    )
    assert cfg.model.name == "resnet18" and cfg.model.pretrained is False
    assert cfg.trainer.max_epochs == 3  # the command line wins over the experiment
    assert cfg.data.num_samples == 600  # from the experiment


def test_relative_workdir_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(["workdir=rel"])
    assert Path(cfg.workdir) == tmp_path / "rel"
    assert cfg.storage.root == str(tmp_path / "rel" / "artifacts")


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.max_epoch=3", "trainer.max_epoch"),  # unknown key
        ("+trainer.max_epoch=3", "max_epoch"),  # unknown key, forced in
        ("trainer.max_epochs=abc", "trainer.max_epochs"),  # wrong type
        ("data.image_size=3.5", "data.image_size"),
        ("model=nope", "model/nope"),  # unknown group option
    ],
)
def test_bad_overrides_fail_naming_the_key(override, named):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert named in str(err.value)


def test_local_paths_follow_visionflow_home(tmp_path, monkeypatch):
    """The schema's defaults, not a YAML copy of them: storage and tracking live under workdir."""
    monkeypatch.setenv("VISIONFLOW_HOME", str(tmp_path / "home"))
    cfg = load_config()
    assert cfg.workdir == str(tmp_path / "home")
    assert cfg.storage.root == f"{tmp_path}/home/artifacts"
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/home/mlflow.db"


def test_every_schema_key_can_be_overridden(tmp_path):
    cfg = load_config([f"workdir={tmp_path}", "data.max_bad_fraction=0.2", "data.num_workers=2"])
    assert cfg.data.max_bad_fraction == 0.2 and cfg.data.num_workers == 2


def test_a_missing_required_value_is_named():
    from visionflow.compose.validation import validate

    with pytest.raises(ConfigError, match=r"data=imagefolder needs data.root"):
        validate(load_config(["data=imagefolder"]))


def test_configs_are_found_from_an_installed_copy(tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "configs"
    shutil.copytree(config_dir(), copy)
    monkeypatch.setenv("VISIONFLOW_CONFIG_DIR", str(copy))
    (copy / "model" / "tiny_copy.yaml").write_text("name: simple_cnn\nwidth: 4\n")
    assert load_config(["model=tiny_copy"]).model.width == 4
