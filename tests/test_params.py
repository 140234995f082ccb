"""Parameters: parsed from notebooks, merged from profiles, each problem reported in one line."""

import pytest

from moecollab.params import (
    Parameter,
    ParameterError,
    parse_override,
    parse_parameters,
    resolve,
    type_problem,
)
from moecollab.stages import STAGES, Check

CELL = '''\
profile: str = "default"   # set by the runner
artifacts_root: str = "artifacts"  # set by the runner
output_dir: str = ""       # set by the runner
n_layers: int = 4          # decoder layers
lr: float = 0.003          # peak learning rate
domains: list[str] = ["law", "biology"]  # fields
top_k: int = 2             # experts per token
n_experts: int = 8         # experts per layer
device: str = "auto"       # auto | cpu | cuda
'''


def declared():
    return {"00_model": parse_parameters(CELL)}


def test_parse_parameters_reads_type_default_and_comment():
    parsed = parse_parameters(CELL)
    assert parsed["n_layers"] == Parameter("n_layers", "int", 4, "decoder layers")
    assert parsed["domains"].default == ["law", "biology"]


def test_parse_parameters_rejects_statements_that_are_not_annotated_literals():
    with pytest.raises(ParameterError, match="line 1"):
        parse_parameters("x = compute()")
    with pytest.raises(ParameterError, match="not a literal"):
        parse_parameters("x: int = compute()")


@pytest.mark.parametrize(("value", "annotation", "ok"), [
    (3, "int", True), (True, "int", False), (3, "float", True), ("3", "float", False),
    (["a"], "list[str]", True), (["a", 1], "list[str]", False), (None, "str | None", True),
    (None, "str", False), ({"a": 1}, "dict", True),
])
def test_type_problem(value, annotation, ok):
    assert (type_problem(value, annotation) is None) == ok


def test_defaults_survive_and_overrides_apply_in_order():
    values = resolve({"lr": 0.01}, [("n_layers", 2), ("00_model.n_layers", 3)], declared())
    assert values["00_model"]["lr"] == 0.01
    assert values["00_model"]["n_layers"] == 3
    assert values["00_model"]["domains"] == ["law", "biology"]
    assert "profile" not in values["00_model"]


@pytest.mark.parametrize(("settings", "overrides", "message"), [
    ({}, [("n_layer", 2)], "unknown parameter 'n_layer' .*did you mean 'n_layers'"),
    ({}, [("n_layers", "four")], "parameter 'n_layers' of stage 00_model must be of type int; "
                                 "got 'four'"),
    ({}, [("n_layers", 0)], r"parameter 'n_layers' of stage 00_model must be in \[1, 48\]; got 0"),
    ({}, [("lr", 0)], r"'lr' of stage 00_model must be in \(0, 1\]"),
    ({}, [("device", "gpu")],
     "'device' of stage 00_model must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got 'gpu'"),
    ({}, [("domains", ["law", "astrology"])], "'domains' .*must be one of"),
    ({}, [("top_k", 9)], "'top_k' of stage 00_model must be <= n_experts"),
    ({}, [("99_nothing.n_layers", 2)], "unknown stage '99_nothing'"),
    ({}, [("profile", "x")], "unknown parameter 'profile'"),
    # Where a stage writes is the runner's to decide: a profile cannot redirect it.
    ({}, [("output_dir", "/etc")], "unknown parameter 'output_dir'"),
    ({"artifacts_root": "/tmp/elsewhere"}, [], "unknown parameter 'artifacts_root'"),
    ({"00_model": {"lrr": 1}}, [], "unknown parameter 'lrr' for stage 00_model .*'lr'"),
])
def test_bad_parameters_fail_with_one_clear_line(settings, overrides, message):
    with pytest.raises(ParameterError, match=message) as error:
        resolve(settings, overrides, declared())
    assert "\n" not in str(error.value)


def test_parse_override_reads_yaml_values():
    assert parse_override("n=3") == ("n", 3)
    assert parse_override("domains=[law, biology]") == ("domains", ["law", "biology"])
    assert parse_override("00_model.lr=1e-3") == ("00_model.lr", 1e-3)
    with pytest.raises(ParameterError, match="key=value"):
        parse_override("n")


def test_check_describes_ranges():
    assert Check(low=0, high=1, high_open=True).describe() == "in [0, 1)"
    assert Check(low=1).describe() == ">= 1"
    assert Check(low=0, each=True).problem([1, -1]) == "every element must be >= 0"


def test_every_checked_parameter_exists_in_its_notebook():
    from moecollab.artifacts import repo_root
    from moecollab.params import stage_parameters

    for stage in STAGES:
        names = stage_parameters(stage, repo_root()).keys()
        missing = set(stage.checks) - set(names)
        assert not missing, f"{stage.name} checks parameters it does not declare: {missing}"


def test_atom_counts_may_not_grow_from_level_to_level():
    cell = 'n_atoms: list[int] = [8, 4]  # atoms per level\nseed: int = 0  # seed\n'
    with pytest.raises(ParameterError, match="'n_atoms' of stage 03_hsdl must be a non-empty"):
        resolve({}, [("n_atoms", [4, 8])], {"03_hsdl": parse_parameters(cell)})
