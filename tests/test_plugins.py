"""Methods and terms are plug-ins: one registered from this file alone trains, checkpoints and
resumes; the README's worked examples run exactly as written."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from s4mc.schema import Key
from s4mc.engine import loop
from s4mc.engine.run_header import format_run_header, preview_run_header
from s4mc.errors import ConfigError
from s4mc.methods import METHODS
from s4mc.terms import TERMS, register_term

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def registries():
    """Undo every registration a test makes, so other tests see the built-in methods and terms only."""
    methods, terms = dict(METHODS), dict(TERMS)
    yield
    for registry, saved in ((METHODS, methods), (TERMS, terms)):
        registry.clear()
        registry.update(saved)


def register_tiny_term():
    @register_term("tiny", schema={"loss_weight": Key(0.5, (int, float)), "label": Key("tiny", (str,))})
    class Tiny:
        """Mean of the student's unlabeled logits, weighted; counts its calls as its state."""

        def __init__(self, block, cfg, device):
            self.weight, self.calls = block["loss_weight"], 0

        def __call__(self, state, inputs):
            n_l = inputs.labeled_label.shape[0]
            assert inputs.pseudo_label.shape[0] == inputs.student["pred"].shape[0] - n_l
            loss = self.weight * inputs.student["pred"][n_l:].float().mean()
            self.calls += 1
            return loss, {"loss_tiny": loss.detach(), "tiny_calls": torch.tensor(float(self.calls))}

        def state_dict(self):
            return {"calls": self.calls}

        def load_state_dict(self, saved):
            self.calls = saved["calls"]

    return Tiny


def metrics_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_term_registered_here_trains_logs_checkpoints_and_resumes(toy_root, toy_cfg, tmp_path, registries):
    register_tiny_term()
    opts = {"trainer.eval_on": False, "trainer.log_every": 1, "trainer.terms": {"tiny": {"loss_weight": 0.25}}}
    cfg = toy_cfg(toy_root, tmp_path, **opts, **{"trainer.max_iters": 2, "trainer.save_every": 2})
    assert cfg["trainer"]["terms"]["tiny"] == {"loss_weight": 0.25, "label": "tiny"}  # the term's defaults
    loop.train(cfg, name="run")
    lines = metrics_lines(tmp_path / "run")
    assert [line["tiny_calls"] for line in lines] == [1.0, 2.0]
    assert all(line["loss_tiny"] != 0 for line in lines)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "latest.pth", weights_only=True)
    assert ckpt["term_states"] == {"tiny": {"calls": 2}}

    longer = toy_cfg(toy_root, tmp_path, **opts, **{"trainer.max_iters": 3})
    loop.train(longer, name="run", resume="auto")
    assert metrics_lines(tmp_path / "run")[-1]["tiny_calls"] == 3.0  # the count came back from the checkpoint


def test_a_terms_block_is_checked_by_the_terms_own_schema(toy_root, toy_cfg, tmp_path, registries):
    register_tiny_term()
    with pytest.raises(ConfigError, match="trainer.terms.tiny.loss_weight' must be"):
        toy_cfg(toy_root, tmp_path, **{"trainer.terms": {"tiny": {"loss_weight": "heavy"}}})
    with pytest.raises(ConfigError, match="unknown key 'trainer.terms.tiny.weight'"):
        toy_cfg(toy_root, tmp_path, **{"trainer.terms": {"tiny": {"weight": 1}}})
    with pytest.raises(ConfigError, match="unknown term 'trainer.terms.tinny'"):
        toy_cfg(toy_root, tmp_path, **{"trainer.terms": {"tinny": {}}})
    cfg = toy_cfg(toy_root, tmp_path, **{"trainer.terms.tiny.loss_weight": 2})  # a dotted --opts key
    assert cfg["trainer"]["terms"]["tiny"]["loss_weight"] == 2.0


def test_the_contrastive_term_answers_to_both_keys_but_not_twice(toy_root, toy_cfg, tmp_path):
    from s4mc.terms import active_terms

    old = toy_cfg(toy_root, tmp_path, **{"trainer.contrastive": {"num_queries": 16}})
    new = toy_cfg(toy_root, tmp_path, **{"trainer.terms": {"contrastive": {"num_queries": 16}}})
    assert active_terms(old) == active_terms(new) and active_terms(old)["contrastive"]["num_queries"] == 16
    with pytest.raises(ConfigError, match="configured twice"):
        toy_cfg(toy_root, tmp_path, **{"trainer.contrastive": {}, "trainer.terms": {"contrastive": {}}})


def readme_example(kind: str) -> tuple[str, dict]:
    """The python file and the config block of the README's worked example `kind`."""
    text = (REPO / "README.md").read_text()
    section = re.search(rf"<!-- worked-example: {kind} -->(.*?)<!-- end worked-example: {kind} -->", text, re.S)
    assert section, f"README has no worked example for a {kind}"
    python = re.search(r"```python\n(.*?)```", section.group(1), re.S).group(1)
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section.group(1), re.S).group(1))
    return python, config


def load_as_module(source: str, path: Path):
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flat(block: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in block.items():
        if isinstance(value, dict) and not (prefix == "trainer.terms." or key == "terms"):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("kind", ["term", "method"])
def test_the_readme_worked_example_works_as_written(kind, toy_root, toy_cfg, tmp_path, registries):
    python, config = readme_example(kind)
    first_line = python.splitlines()[0]
    assert first_line.startswith("# ") and first_line.endswith(".py"), "the example names its one file"
    load_as_module(python, tmp_path / first_line[2:])
    cfg = toy_cfg(toy_root, tmp_path, **flat(config), **{"trainer.max_iters": 2, "trainer.eval_on": False,
                                                          "trainer.log_every": 1})
    summary = loop.train(cfg, name=kind)
    assert summary["iterations"] == 2
    lines = metrics_lines(tmp_path / kind)
    if kind == "term":
        assert all(line["loss_entropy_min"] > 0 for line in lines)
    else:
        assert all("loss_unsup" not in line for line in lines) and all(line["loss"] > 0 for line in lines)


def header_text(cfg) -> str:
    return format_run_header(preview_run_header(cfg, 1, "cpu"))


@pytest.mark.parametrize("kind", ["term", "method"])
def test_the_run_header_describes_the_readme_examples(kind, toy_root, toy_cfg, tmp_path, registries):
    python, config = readme_example(kind)
    load_as_module(python, tmp_path / python.splitlines()[0][2:])
    text = header_text(toy_cfg(toy_root, tmp_path, **flat(config)))
    if kind == "term":  # the term joins the mean teacher's own words, by its name
        assert "mean teacher, semi-supervised" in text and "terms: entropy_min" in text
        assert "U2PL contrastive" not in text
    else:  # a method without `describe` is named, never passed off as the mean teacher
        assert "method labeled_only" in text and "mean teacher" not in text


def test_the_contrastive_term_is_described_as_on(toy_root, toy_cfg, tmp_path):
    for opts in ({"trainer.contrastive": {"num_queries": 16}}, {"trainer.terms": {"contrastive": {}}}):
        text = header_text(toy_cfg(toy_root, tmp_path, **opts))
        assert "terms: U2PL contrastive (weight 1," in text and " off" not in text.split("terms:")[1].split("\n")[0]
    assert "no additive terms" in header_text(toy_cfg(toy_root, tmp_path))


def unimatch_copy_source() -> str:
    """s4mc/methods/unimatch.py renamed to `unimatch_copy`, with one new key that its header line shows:
    what a researcher writes to start a new method from UniMatch (one file)."""
    source = (REPO / "s4mc" / "methods" / "unimatch.py").read_text()
    edits = [('@register_method("unimatch", schema=SETTINGS)',
              '@register_method("unimatch_copy", schema={**SETTINGS, "extra_note": key("none", str)})'),
             ('cfg["trainer"]["unimatch"]', 'cfg["trainer"]["unimatch_copy"]'),
             ('return (f"UniMatch (', 'return (f"UniMatch copy, note {u[\'extra_note\']} (')]
    for old, new in edits:
        assert old in source, f"unimatch.py no longer has {old!r}: update this test's edit"
        source = source.replace(old, new)
    return "# unimatch_copy.py\n" + source


def test_a_method_with_its_own_settings_is_one_file(toy_root, toy_cfg, tmp_path, registries):
    load_as_module(unimatch_copy_source(), tmp_path / "unimatch_copy.py")
    opts = {"trainer.method": "unimatch_copy", "trainer.eval_on": False, "trainer.log_every": 1}
    cfg = toy_cfg(toy_root, tmp_path, **opts, **{"trainer.unimatch_copy.extra_note": "hello",
                                                 "trainer.max_iters": 2})
    assert cfg["trainer"]["unimatch_copy"]["extra_note"] == "hello"
    assert cfg["trainer"]["unimatch_copy"]["threshold"] == 0.95  # the copied keys keep their defaults
    assert "UniMatch copy, note hello (single model)" in header_text(cfg)
    with pytest.raises(ConfigError, match="unknown key 'trainer.unimatch_copy.extra_note_typo'"):
        toy_cfg(toy_root, tmp_path, **opts, **{"trainer.unimatch_copy.extra_note_typo": 1})
    assert loop.train(cfg, name="copy")["iterations"] == 2
    assert all("loss_s1" in line for line in metrics_lines(tmp_path / "copy"))
