"""Every YAML under conf/ composes, and bad values fail before any model is loaded."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from harness.errors import ConfigError
from harness.run.config import SWEEPS
from tests.helpers import CONF, choice_of, job_of


def group_overrides():
    """Every config of every group under conf/, and every named sweep of sweeps/."""
    for path in sorted(CONF.rglob("*.yaml")):
        rel = path.relative_to(CONF)
        if rel.parent == Path("."):
            continue
        group, name = str(rel.parent), rel.stem
        yield ("+" if group == "method" else "") + f"{group}={name}"
    for path in sorted(SWEEPS.glob("*.yaml")):
        yield f"+sweep={path.stem}"


@pytest.mark.parametrize("override", list(group_overrides()))
def test_every_config_composes(override, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[override], return_hydra_config=True)
    OmegaConf.resolve(cfg)  # interpolations resolve too
    if override.startswith("+method="):
        assert choice_of(cfg).name == override.split("=")[1]


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_misspelt_key_is_rejected():
    with pytest.raises(ConfigCompositionException, match="Could not override 'tua'"):
        compose_cfg("+method=scissor", "tua=0.9")


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigCompositionException, match="Error merging override tau=abc") as err:
        compose_cfg("+method=scissor", "tau=abc")
    assert "Value 'abc' of type 'str' could not be converted to Float" in str(err.value.__cause__)


def test_misspelt_method_knob_is_rejected():
    cfg = compose_cfg("+method=uniform", "+method.retension=0.3")
    with pytest.raises(ConfigError, match="retension.*its knobs are retention"):
        choice_of(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["+method=scissor", "tau=1.5"], r"tau=1.5: expected a value in \[-1"),
    (["+method=uniform", "retention=0"], r"retention=0.*expected a value in \(0"),
    (["+method=uniform", "retention=1.2"], r"retention=1.2.*expected a value in \(0"),
    (["tau=0.9"], "method none has no knob tau"),
    (["+method=topk", "tau=0.9"], "method topk has no knob tau"),
    (["+method=scissor", "tau=0.9", "retention=0.2"], "either tau=0.9 or retention=0.2"),
])
def test_knob_out_of_range(overrides, message):
    with pytest.raises(ConfigError, match=message):
        choice_of(compose_cfg(*overrides))


def test_the_reference_ignores_a_retention_target(capsys):
    choice = choice_of(compose_cfg("retention=0.5"))  # a sweep point of `none`: same run
    assert choice.name == "none" and choice.target_retention is None and choice.knobs == {}
    assert "does not apply" in capsys.readouterr().err


def test_top_level_knobs_reach_the_method():
    assert choice_of(compose_cfg("+method=scissor", "tau=0.85")).knobs["tau"] == 0.85
    assert choice_of(compose_cfg("+method=scissor")).knobs["tau"] == 0.9
    choice = choice_of(compose_cfg("+method=uniform", "retention=0.1"))
    assert choice.knobs == {"retention": 0.1} and choice.target_retention is None
    choice = choice_of(compose_cfg("+method=scissor", "retention=0.1"))
    assert choice.target_retention == 0.1


def test_unknown_method_names_the_known_ones():
    with pytest.raises(MissingConfigException, match="Could not find 'method/scisor'") as err:
        compose_cfg("+method=scisor")
    assert "\tscissor\n" in str(err.value)  # the known names are listed
    cfg = compose_cfg("method.name=foo")
    with pytest.raises(ConfigError, match="unknown method, expected one of .*none.*scissor.*uniform"):
        choice_of(cfg)


@pytest.mark.slow
def test_run_ids_are_stable_and_change_exactly_with_what_changes_the_results():
    from harness.run.identity import run_id

    def rid(*overrides):
        return run_id(job_of(compose_cfg("model=tiny", "task=smoke", "cache_dir=/fixed/cache", *overrides)))

    base = rid("+method=scissor", "tau=0.9")
    assert base == GOLDEN_RUN_ID  # the same config lands in the same directory across versions
    assert rid("+method=scissor", "tau=0.9", "results_dir=/elsewhere", "progress=false", "resume=false",
               "logger=wandb", "feature_cache=false") == base
    for change in (["tau=0.85"], ["method.epsilon=0.1"], ["model.frames=4"], ["task.limit=3"],
                   ["seed=1"], ["model.dtype=bfloat16"]):
        assert rid("+method=scissor", "tau=0.9", *change) != base, change
    # where the checkout and its cache live is no part of it: a copied results directory resumes
    assert rid("+method=scissor", "tau=0.9", "cache_dir=/other/cache") == base
    # a calibrated target is part of the identity, and so is its calibration set
    assert rid("+method=scissor", "retention=0.2") != rid("+method=scissor", "retention=0.3")
    assert rid("+method=scissor", "retention=0.2") != rid("+method=scissor", "retention=0.2",
                                                         "task.calibration_size=8")


# run_id(model=tiny task=smoke +method=scissor tau=0.9 cache_dir=/fixed/cache), recorded once; if a change to the
# identity is intended, every existing results directory stops resuming: say so in the change
# (changed once, deliberately: the identity rests on content and device type, not on cache paths)
GOLDEN_RUN_ID = "smoke-tiny-scissor-tau0.9-df8e98e9"
