"""Stage parameters: read from notebooks' ``parameters`` cells, merged from profiles, checked.

A notebook's ``parameters`` cell is the one source of each default and type::

    n_layers: int = 4          # decoder layers
    domains: list[str] = [...]  # which corpus domains to use

Profiles (``notebooks/params/<name>.yml``) only list changes, either at the top level (applied
to every stage that declares the name) or under a stage's name::

    seed: 1
    00_model:
      n_steps: 40

Every problem is reported as one line naming the parameter, the value and what is allowed,
before any stage runs.
"""

from __future__ import annotations

import ast
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .stages import RUNNER_PARAMETERS, STAGE_NAMES, STAGES, Stage


class ParameterError(ValueError):
    """A user-facing problem with parameters or profiles (reported without a traceback)."""


@dataclass(frozen=True)
class Parameter:
    name: str
    annotation: str      # as written in the notebook, e.g. "list[int]"
    default: Any
    help: str            # the trailing comment

    def describe(self) -> str:
        return f"{self.name}: {self.annotation} = {self.default!r}  {self.help}".rstrip()


def read_parameters_cell(notebook: str | os.PathLike) -> str:
    """The source of the cell tagged ``parameters`` in a MyST (jupytext) notebook."""
    import jupytext  # imported here: only the runner needs it

    notebook_node = jupytext.read(notebook)
    for cell in notebook_node.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return cell.source
    raise ParameterError(f"{notebook} has no cell tagged 'parameters'")


def parse_parameters(source: str, origin: str = "<parameters>") -> dict[str, Parameter]:
    """Parse annotated literal assignments with trailing comments.

    Examples
    --------
    >>> parsed = parse_parameters('n: int = 3  # how many\\nname: str = "a"')
    >>> parsed["n"].default, parsed["n"].annotation, parsed["n"].help
    (3, 'int', 'how many')
    """
    lines = source.splitlines()
    parameters = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and node.value is not None):
            raise ParameterError(
                f"{origin} line {node.lineno}: every line of a parameters cell must be "
                "'name: type = literal  # comment'")
        try:
            default = ast.literal_eval(node.value)
        except ValueError:
            raise ParameterError(
                f"{origin}: the default of {node.target.id!r} is not a literal") from None
        line = lines[node.end_lineno - 1]
        comment = line.split("#", 1)[1].strip() if "#" in line[node.end_col_offset:] else ""
        parameters[node.target.id] = Parameter(
            node.target.id, ast.unparse(node.annotation), default, comment)
    return parameters


def stage_parameters(stage: Stage, root: Path) -> dict[str, Parameter]:
    """The declared parameters of one stage's notebook."""
    path = root / stage.notebook
    if not path.is_file():
        raise ParameterError(f"stage {stage.name}: notebook {path} does not exist")
    return parse_parameters(read_parameters_cell(path), origin=stage.notebook)


def type_problem(value: Any, annotation: str) -> str | None:
    """What is wrong with ``value`` for a simple annotation, or None.

    Handles ``int``, ``float``, ``str``, ``bool``, ``dict``, ``list[T]`` and ``T | None``.
    """
    options = [part.strip() for part in annotation.split("|")]
    if "None" in options and value is None:
        return None
    for option in (o for o in options if o != "None"):
        if _matches(value, option):
            return None
    return f"must be of type {annotation}"


def _matches(value: Any, annotation: str) -> bool:
    if annotation.startswith("list[") and annotation.endswith("]"):
        inner = annotation[5:-1]
        return isinstance(value, list) and all(_matches(item, inner) for item in value)
    simple = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
        "dict": lambda v: isinstance(v, dict),
        "list": lambda v: isinstance(v, list),
    }
    check = simple.get(annotation)
    return bool(check and check(value))


def find_profile(profile: str, root: Path) -> Path:
    """A profile name (``notebooks/params/<name>.yml``) or a path to a YAML file."""
    candidate = Path(profile)
    if candidate.suffix in (".yml", ".yaml"):
        if not candidate.is_file():
            raise ParameterError(f"profile file {profile!r} does not exist")
        return candidate
    path = root / "notebooks" / "params" / f"{profile}.yml"
    if not path.is_file():
        available = sorted(p.stem for p in (root / "notebooks" / "params").glob("*.yml"))
        raise ParameterError(
            f"unknown profile {profile!r}; available: {', '.join(available)} "
            "(or give a path to a .yml file)")
    return path


def profile_name(profile: str) -> str:
    """The name artifacts are filed under: the file stem for a path, else the name itself."""
    return Path(profile).stem if Path(profile).suffix in (".yml", ".yaml") else profile


def load_profile(path: Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ParameterError(f"profile {path} is not valid YAML: {error}".splitlines()[0]) \
            from None
    if not isinstance(content, dict):
        raise ParameterError(f"profile {path} must be a mapping of parameter names to values")
    return content


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` (or ``stage.key=value``) with the value read as YAML."""
    if "=" not in text:
        raise ParameterError(f"-p expects key=value; got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def resolve(profile_settings: dict[str, Any], overrides: list[tuple[str, Any]],
            declared: dict[str, dict[str, Parameter]]) -> dict[str, dict[str, Any]]:
    """Merge defaults ← profile ← overrides for every stage and check every value.

    Parameters
    ----------
    profile_settings : the profile's mapping (top-level names and per-stage sections)
    overrides : ``-p`` pairs in order; keys may be ``name`` or ``stage.name``
    declared : stage name → its notebook's parameters

    Returns
    -------
    stage name → parameter values (runner parameters excluded).
    """
    per_stage: dict[str, dict[str, Any]] = {
        name: {key: p.default for key, p in params.items() if key not in RUNNER_PARAMETERS}
        for name, params in declared.items()}
    settings = [(key, value, "profile") for key, value in profile_settings.items()
                if key not in ("description",)]
    settings += [(key, value, "-p") for key, value in overrides]

    for key, value, origin in settings:
        if key in STAGE_NAMES and isinstance(value, dict) and origin == "profile":
            for inner_key, inner_value in value.items():
                _assign(per_stage, declared, key, inner_key, inner_value, origin)
            continue
        stage_name, _, name = key.rpartition(".")
        if stage_name:
            if stage_name not in STAGE_NAMES:
                raise ParameterError(
                    f"unknown stage {stage_name!r} in {origin} setting {key!r}; "
                    f"stages are: {', '.join(STAGE_NAMES)}")
            _assign(per_stage, declared, stage_name, name, value, origin)
            continue
        targets = [stage for stage, params in declared.items() if name in params]
        if not targets or name in RUNNER_PARAMETERS:
            raise ParameterError(_unknown(name, declared, origin))
        for stage in targets:
            _assign(per_stage, declared, stage, name, value, origin)

    for stage in STAGES:
        if stage.name not in per_stage:
            continue
        for name, value in per_stage[stage.name].items():
            _check_value(stage, declared[stage.name][name], value)
        _check_relations(stage.name, per_stage[stage.name])
    return per_stage


def _assign(per_stage, declared, stage, name, value, origin) -> None:
    if stage not in declared:
        return  # a stage outside this run
    if name not in declared[stage] or name in RUNNER_PARAMETERS:
        raise ParameterError(_unknown(name, {stage: declared[stage]}, origin, stage))
    per_stage[stage][name] = value


def _unknown(name: str, declared: dict[str, dict[str, Parameter]], origin: str,
             stage: str | None = None) -> str:
    known = sorted({key for params in declared.values() for key in params
                    if key not in RUNNER_PARAMETERS})
    where = f"for stage {stage}" if stage else "for any stage"
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
    return f"unknown parameter {name!r} {where} (from {origin}){hint}"


def _check_value(stage: Stage, parameter: Parameter, value: Any) -> None:
    problem = type_problem(value, parameter.annotation)
    check = stage.all_checks().get(parameter.name)
    if problem is None and check is not None and value is not None:
        problem = check.problem(value)
    if problem:
        raise ParameterError(
            f"parameter {parameter.name!r} of stage {stage.name} {problem}; got {value!r}")


def _check_relations(stage: str, values: dict[str, Any]) -> None:
    """Constraints between parameters of one stage."""
    if {"top_k", "n_experts"} <= values.keys() and values["top_k"] > values["n_experts"]:
        raise ParameterError(
            f"parameter 'top_k' of stage {stage} must be <= n_experts "
            f"({values['n_experts']}); got {values['top_k']!r}")
    atoms = values.get("n_atoms")
    if isinstance(atoms, list) and (not atoms or any(
            a < b for a, b in zip(atoms, atoms[1:], strict=False))):
        raise ParameterError(
            f"parameter 'n_atoms' of stage {stage} must be a non-empty list that does not grow "
            f"from level to level (level l+1 is learned from level l's atoms); got {atoms!r}")
    if isinstance(values.get("tasks"), list) and "local" not in values["tasks"]:
        raise ParameterError(
            f"parameter 'tasks' of stage {stage} must include 'local' (the chapter's tables are "
            f"built from the corpus tasks), e.g. [local, paper]; got {values['tasks']!r}")
    if {"hidden_size", "n_heads"} <= values.keys() and values["hidden_size"] % values["n_heads"]:
        raise ParameterError(
            f"parameter 'n_heads' of stage {stage} must divide hidden_size "
            f"({values['hidden_size']}); got {values['n_heads']!r}")
