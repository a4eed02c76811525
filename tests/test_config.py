"""Config loading: defaults, overrides, release aliases, and errors that name the culprit."""

from pathlib import Path

import pytest
import yaml

from s4mc import REPO_ROOT
from s4mc.config import load_config, parse_override
from s4mc.errors import ConfigError


def minimal(**extra):
    cfg = {
        "dataset": {
            "type": "pascal",
            "train": {"data_root": "data/VOC2012", "data_list": "data/splits/pascal/92/labeled.txt"},
            "val": {"data_root": "data/VOC2012", "data_list": "data/splits/pascal/val.txt"},
        },
        "trainer": {"epochs": 80},
        "net": {"num_classes": 21},
    }
    for dotted, value in extra.items():
        node = cfg
        parts = dotted.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return cfg


def write(tmp_path, data, name="config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_are_merged_and_paths_resolve_against_repo_root(tmp_path):
    cfg = load_config(write(tmp_path, minimal()))
    unsup = cfg["trainer"]["unsupervised"]
    assert unsup["keep_percent"] == 60.0 and unsup["indicator"] == "margin"
    assert unsup["neighborhood_size"] == 4 and unsup["num_neighbors"] == 1
    assert cfg["net"]["ema_decay"] == 0.99
    assert cfg["trainer"]["contrastive"] is None and cfg["net"]["aux_loss"] is None
    assert cfg["dataset"]["train"]["data_root"] == str(REPO_ROOT / "data" / "VOC2012")
    # The unlabeled list is derived from the labeled one, as U2PL does.
    assert cfg["dataset"]["train"]["unlabeled_list"].endswith("pascal/92/unlabeled.txt")


def test_overrides_parse_types(tmp_path):
    cfg = load_config(
        write(tmp_path, minimal()),
        [
            "trainer.epochs=3",
            "trainer.optimizer.kwargs.lr=0.01",
            "trainer.unsupervised.indicator=entropy",
            "dataset.train.crop.size=[65, 65]",
            "trainer.unsupervised.refine=false",
        ],
    )
    assert cfg["trainer"]["epochs"] == 3
    assert cfg["trainer"]["optimizer"]["kwargs"]["lr"] == pytest.approx(0.01)
    assert cfg["trainer"]["unsupervised"]["indicator"] == "entropy"
    assert cfg["dataset"]["train"]["crop"]["size"] == [65, 65]
    assert cfg["trainer"]["unsupervised"]["refine"] is False


def test_release_aliases_map_to_new_names(tmp_path):
    data = minimal()
    data["dataset"]["type"] = "pascal_semi"
    data["dataset"]["ignore_label"] = 255
    data["trainer"]["unsupervised"] = {
        "drop_percent": 80,
        "apply_aug": "classmix",
        "neigborhood_size": 8,
        "n_neigbors": 3,
    }
    data["main_mode"] = {"eval": False, "compare": False}
    data["saver"] = {"snapshot_dir": "ck"}
    cfg = load_config(write(tmp_path, data), ["trainer.unsupervised.n_neigbors=2"])
    unsup = cfg["trainer"]["unsupervised"]
    assert cfg["dataset"]["type"] == "pascal"
    assert unsup["keep_percent"] == 80 and unsup["mixing"] == "classmix"
    assert unsup["neighborhood_size"] == 8 and unsup["num_neighbors"] == 2
    assert "mode" not in cfg and "main_mode" not in cfg
    assert cfg["saver"]["checkpoint_dir"] == "ck"
    # A release file keeps its paths relative to its own folder.
    assert cfg["path_base"] == "config"
    assert cfg["dataset"]["train"]["data_root"] == str((tmp_path / "data" / "VOC2012").resolve())


def test_optional_blocks_switch_on_by_presence(tmp_path):
    data = minimal()
    data["trainer"]["contrastive"] = {"num_queries": 128}
    data["net"]["aux_loss"] = {"aux_plane": 1024, "loss_weight": 0.4}
    cfg = load_config(write(tmp_path, data))
    assert cfg["trainer"]["contrastive"]["num_queries"] == 128
    assert cfg["trainer"]["contrastive"]["temperature"] == 0.5
    assert cfg["net"]["aux_loss"]["loss_weight"] == 0.4


def test_prior_file_resolves_against_path_base(tmp_path):
    cfg = load_config(write(tmp_path, minimal()), ["trainer.unsupervised.neighbor_prior=data/priors/voc92.json"])
    assert cfg["trainer"]["unsupervised"]["neighbor_prior"] == str(REPO_ROOT / "data" / "priors" / "voc92.json")


def test_env_and_home_expand(tmp_path, monkeypatch):
    monkeypatch.setenv("S4MC_TEST_DATA", str(tmp_path / "somewhere"))
    data = minimal()
    data["dataset"]["train"]["data_root"] = "$S4MC_TEST_DATA/voc"
    cfg = load_config(write(tmp_path, data))
    assert cfg["dataset"]["train"]["data_root"] == str(tmp_path / "somewhere" / "voc")


def test_unknown_key_is_rejected_with_suggestion_and_file(tmp_path):
    data = minimal()
    data["trainer"]["unsupervised"] = {"keep_precent": 70}
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "trainer.unsupervised.keep_precent" in msg
    assert "keep_percent" in msg.split("did you mean")[1]
    assert str(path) in msg


def test_misspelled_top_level_key(tmp_path):
    data = minimal()
    data["trainr"] = {"epochs": 2}
    with pytest.raises(ConfigError, match=r"'trainr'.*did you mean 'trainer'"):
        load_config(write(tmp_path, data))


def test_unknown_override_key_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.epoch'.*did you mean 'trainer\.epochs'"):
        load_config(write(tmp_path, minimal()), ["trainer.epoch=3"])


def test_wrong_type_is_rejected(tmp_path):
    data = minimal()
    data["trainer"]["epochs"] = "eighty"
    with pytest.raises(ConfigError, match=r"'trainer\.epochs' must be int, got 'eighty'"):
        load_config(write(tmp_path, data))


def test_bad_choice_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"indicator' = 'margn'.*did you mean 'margin'"):
        load_config(write(tmp_path, minimal()), ["trainer.unsupervised.indicator=margn"])


def test_missing_required_key(tmp_path):
    data = minimal()
    del data["net"]["num_classes"]
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=r"required key 'net\.num_classes' is missing") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as err:
        load_config(missing)
    assert str(missing) in str(err.value)


def test_invalid_yaml_is_named(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("dataset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_bounds_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="keep_percent"):
        load_config(write(tmp_path, minimal()), ["trainer.unsupervised.keep_percent=120"])
    with pytest.raises(ConfigError, match="num_neighbors"):
        load_config(write(tmp_path, minimal()), ["trainer.unsupervised.num_neighbors=5"])
    with pytest.raises(ConfigError, match="ignore_index"):
        load_config(write(tmp_path, minimal()), ["dataset.ignore_index=3"])


def test_alias_and_new_name_together_is_an_error(tmp_path):
    data = minimal()
    data["trainer"]["unsupervised"] = {"drop_percent": 80, "keep_percent": 70}
    with pytest.raises(ConfigError, match="given twice"):
        load_config(write(tmp_path, data))


def test_parse_override_needs_equals():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=none") == ("a.b", "none")
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("trainer.epochs")


def test_shipped_experiment_configs_load():
    # study.yaml files name configs, rows and seeds (python -m s4mc.study); tests/test_study_tool.py loads them
    configs = sorted(p for p in (REPO_ROOT / "experiments").rglob("*.yaml") if p.name != "study.yaml")
    if not configs:
        pytest.skip("no experiment configs yet")
    for path in configs:
        cfg = load_config(path)
        assert cfg["net"]["num_classes"] >= 2, path
        assert Path(cfg["dataset"]["train"]["data_root"]).is_absolute()


def test_ignored_release_keys_give_one_warning_and_switches_that_would_act_are_refused(tmp_path, caplog):
    data = minimal()
    data["main_mode"] = {"eval": False, "compare": False}
    data["dataset"]["noise_std"] = 0.1
    with caplog.at_level("WARNING", logger="s4mc"):
        load_config(write(tmp_path, data))
    warnings = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(warnings) == 1
    for key in ("main_mode.eval", "main_mode.compare", "dataset.noise_std"):
        assert key in warnings[0]
    data["main_mode"] = {"eval": True}
    with pytest.raises(ConfigError, match="main_mode.eval.*eval.py"):
        load_config(write(tmp_path, data))
    data["main_mode"] = {"evaluate": False}
    with pytest.raises(ConfigError, match="unknown key 'main_mode.evaluate'"):
        load_config(write(tmp_path, data))
    with pytest.raises(ConfigError, match="main_mode.compare"):
        load_config(write(tmp_path, minimal()), ["main_mode.compare=true"])


def test_use_weight_true_and_non_random_training_crops_are_refused(tmp_path):
    data = minimal()
    data["criterion"] = {"type": "CELoss", "kwargs": {"use_weight": False}}
    assert load_config(write(tmp_path, data))["criterion"]["kwargs"]["use_weight"] is False
    data["criterion"]["kwargs"]["use_weight"] = True
    with pytest.raises(ConfigError, match="criterion.kwargs.use_weight"):
        load_config(write(tmp_path, data))
    with pytest.raises(ConfigError, match="dataset.train.crop.type"):
        load_config(write(tmp_path, minimal()), ["dataset.train.crop.type=center"])


def test_mix_gate_defaults_to_batch(tmp_path):
    cfg = load_config(write(tmp_path, minimal()))
    assert cfg["trainer"]["unsupervised"]["mix_gate"] == "batch"
    cfg = load_config(write(tmp_path, minimal()), ["trainer.unsupervised.mix_gate=sample"])
    assert cfg["trainer"]["unsupervised"]["mix_gate"] == "sample"
    with pytest.raises(ConfigError, match="mix_gate"):
        load_config(write(tmp_path, minimal()), ["trainer.unsupervised.mix_gate=pixel"])
