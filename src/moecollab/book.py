"""What the book shows of a run: its chapters, the downloads page and the execution status page.

:func:`runner.build_book <moecollab.runner.build_book>` copies each stage's executed notebook
into ``book/notebooks/`` through :func:`chapter_notebook`, which prepares it for readers:

- papermill's injected-parameters cell (which holds the runner's folder names) is replaced by
  a short table of the parameters that this run changed from the defaults shown just above it,
  read from the stage's manifest;
- every path of this machine becomes the path a reader has in a checkout
  (``artifacts/<profile>/<stage>/…``), and run-internal names (a stage's temporary
  ``.<stage>.partial-…`` folder, ``.….tmp.ipynb`` files) become the names they were renamed to;
- every glued figure whose data was saved beside it gets a link to that CSV under its caption.

The same cleaned notebook is what the page's download button offers.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from .artifacts import MANIFEST_NAME
from .params import parse_parameters
from .stages import RUNNER_PARAMETERS, STAGES, Stage

DATA_FOLDER = "book/data"  # the stages' CSV files, copied for the book (git-ignored)
NOTEBOOK_FOLDER = "book/notebooks"  # the chapters as the book shows them (git-ignored)
GENERATED_PAGES = ("book/downloads", "book/status")  # written on every build, in _toc.yml


# ------------------------------------------------------------------------------ chapters

def chapter_notebook(notebook, stage: Stage, manifest: dict[str, Any] | None, *,
                     root: Path, artifacts_root: Path, profile: str):
    """A copy of an executed stage notebook as the book shows it (see the module docstring)."""
    import nbformat

    text = machine_paths_removed(nbformat.writes(notebook), root=root,
                                 artifacts_root=artifacts_root, profile=profile)
    chapter = nbformat.reads(text, as_version=4)
    _replace_injected_parameters(chapter, stage, manifest, profile)
    _link_figure_data(chapter, stage)
    return chapter


def machine_paths_removed(text: str, *, root: Path, artifacts_root: Path, profile: str) -> str:
    """``text`` (a notebook's JSON) with this machine's paths and temporary names replaced.

    Examples
    --------
    >>> text = '"/home/me/study/artifacts/smoke/.03_hsdl.partial-x1y2/codes.safetensors"'
    >>> machine_paths_removed(text, root=Path("/home/me/study"),
    ...                       artifacts_root=Path("/home/me/study/artifacts"), profile="smoke")
    '"artifacts/smoke/03_hsdl/codes.safetensors"'
    """
    def escaped(path: Path | str) -> str:
        return re.escape(json.dumps(str(path))[1:-1])

    profile_folder = f"artifacts/{profile}"
    replacements = [
        # a stage's temporary folder and notebook, anywhere: their final names
        (rf"(?:{escaped(artifacts_root / profile)}/)?\.(\d\d_\w+)\.partial-[A-Za-z0-9_]+",
         rf"{profile_folder}/\1"),
        (rf"(?:{escaped(artifacts_root / profile / 'executed')}/)?"
         rf"\.(\d\d_\w+)\.[A-Za-z0-9_]+\.tmp\.ipynb", rf"{profile_folder}/executed/\1.ipynb"),
        (escaped(artifacts_root), "artifacts"),
        (escaped(root) + "/", ""),
        (escaped(root), "."),
    ]
    if len(root.parts) < 2:  # a checkout at "/" would turn every "//" into nothing
        replacements = replacements[:3]
    for pattern, replacement in replacements:
        text = re.sub(pattern, replacement, text)
    return text


def _replace_injected_parameters(chapter, stage: Stage, manifest: dict[str, Any] | None,
                                 profile: str) -> None:
    import nbformat

    cells = chapter.cells
    injected = [index for index, cell in enumerate(cells)
                if "injected-parameters" in cell.metadata.get("tags", [])]
    declared = next((cell for cell in cells if "parameters" in cell.metadata.get("tags", [])),
                    None)
    if not injected or declared is None:
        return
    defaults = {name: parameter.default
                for name, parameter in parse_parameters(declared.source).items()}
    if manifest is not None:
        used = manifest["parameters"]
    else:  # a notebook without a manifest (should not reach the book): papermill's record
        used = {name: value for name, value in
                chapter.metadata.get("papermill", {}).get("parameters", {}).items()
                if name not in RUNNER_PARAMETERS}
    table = parameters_markdown(stage, profile, defaults, used)
    cells[injected[0]] = nbformat.v4.new_markdown_cell(
        table, metadata={"tags": ["run-parameters"]})
    for index in reversed(injected[1:]):
        del cells[index]
    papermill = chapter.metadata.get("papermill", {})
    if "parameters" in papermill:
        papermill["parameters"] = {"profile": profile, **used}


def parameters_markdown(stage: Stage, profile: str, defaults: dict[str, Any],
                        used: dict[str, Any]) -> str:
    """The reader's view of a run's parameters: the ones that differ from the defaults.

    Examples
    --------
    >>> print(parameters_markdown(STAGES[3], "smoke", {"n_atoms": [32, 16], "seed": 0},
    ...                           {"n_atoms": [6, 3], "seed": 0}))
    **Parameters of this run.** Profile `smoke` changed these from the defaults above:
    <BLANKLINE>
    | parameter | default | this run |
    |---|---|---|
    | `n_atoms` | `[32, 16]` | `[6, 3]` |
    <BLANKLINE>
    Re-run this chapter alone with `python -m moecollab run --profile smoke --only 03_hsdl`.
    """
    changed = {name: value for name, value in used.items()
               if name not in RUNNER_PARAMETERS and defaults.get(name, object()) != value}
    rerun = (f"Re-run this chapter alone with "
             f"`python -m moecollab run --profile {profile} --only {stage.name}`.")
    if not changed:
        return (f"**Parameters of this run.** Profile `{profile}` used every default above. "
                + rerun)
    lines = [f"**Parameters of this run.** Profile `{profile}` changed these from the "
             "defaults above:", "", "| parameter | default | this run |", "|---|---|---|"]
    for name, value in changed.items():
        default = f"`{defaults[name]!r}`" if name in defaults else "(not a parameter above)"
        lines.append(f"| `{name}` | {_cell(default)} | {_cell(f'`{value!r}`')} |")
    return "\n".join([*lines, "", rerun])


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _link_figure_data(chapter, stage: Stage) -> None:
    """Put a link to each glued figure's CSV under the figure's caption."""
    data_files = {}
    for cell in chapter.cells:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            data = output.get("metadata", {}).get("moecollab", {}).get("data")
            if name and data:
                data_files[name] = data
    if not data_files:
        return
    for cell in chapter.cells:
        if cell.cell_type == "markdown" and "glue:figure" in cell.source:
            cell.source = _with_data_links(cell.source, stage, data_files)


_FIGURE_DIRECTIVE = re.compile(r"^(?P<fence>`{3,}|:{3,})\{glue:figure\}\s+(?P<key>\S+)\s*$")


def _with_data_links(source: str, stage: Stage, data_files: dict[str, str]) -> str:
    lines = source.split("\n")
    output: list[str] = []
    open_fence, key = None, None
    for line in lines:
        match = _FIGURE_DIRECTIVE.match(line)
        if open_fence is None and match:
            open_fence, key = match["fence"], match["key"]
        elif open_fence is not None and line.strip() == open_fence:
            if key in data_files:
                name = data_files[key]
                output += ["", f"Data: {{download}}`{name} </{DATA_FOLDER}/{stage.name}/{name}>`"]
            open_fence, key = None, None
        output.append(line)
    return "\n".join(output)


# ------------------------------------------------------------------------------ pages

def write_downloads_page(root: Path, profile_folder: Path) -> Path:
    """Copy every stage's CSV tables next to the book and list them on a downloads page."""
    import shutil

    data_folder = root / DATA_FOLDER
    if data_folder.exists():
        shutil.rmtree(data_folder)
    lines = ["# Download the tables", "",
             "Every table the chapters show, and the data of every figure, as CSV files "
             "written by the stages of this run.",
             "", "| stage | table |", "|---|---|"]
    for stage in STAGES:
        for table in sorted((profile_folder / stage.name).glob("*.csv")):
            target = data_folder / stage.name / table.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(table, target)
            lines.append(f"| {stage.name} | {{download}}`{table.name} "
                         f"<data/{stage.name}/{table.name}>` |")
    page = root / "book" / "downloads.md"
    page.write_text("\n".join(lines) + "\n")
    return page


def load_manifests(profile_folder: Path) -> dict[str, dict[str, Any]]:
    """Stage name → its manifest (as read from JSON), for the stages that finished."""
    manifests = {}
    for stage in STAGES:
        path = profile_folder / stage.name / MANIFEST_NAME
        if path.is_file():
            manifests[stage.name] = json.loads(path.read_text())
    return manifests


def write_status_page(root: Path, profile: str, manifests: dict[str, dict[str, Any]]) -> Path:
    """The execution-status page: when and how long each chapter ran, and with what."""
    lines = ["(status)=", "# Execution status", "",
             f"Every chapter of this book is a notebook executed by papermill, for profile "
             f"`{profile}`, by `python -m moecollab run --profile {profile}`. This page lists, "
             "from each stage's manifest, when it finished, how long it ran and with which "
             "versions. A stage whose parameters, inputs and code did not change is not run "
             "again, so dates can differ between chapters.", "",
             "| chapter | finished (UTC) | run time | notebook | data |", "|---|---|---|---|---|"]
    total = 0.0
    for stage in STAGES:
        manifest = manifests.get(stage.name)
        if manifest is None:
            lines.append(f"| {stage.name} | not run | | | |")
            continue
        total += manifest["seconds"]
        lines.append(
            f"| {{doc}}`{stage.name} · {stage.title} <notebooks/{stage.name}>` "
            f"| {_finished(manifest)} | {format_seconds(manifest['seconds'])} "
            f"| {{download}}`{stage.name}.ipynb <notebooks/{stage.name}.ipynb>` "
            f"| {{doc}}`CSV tables <downloads>` |")
    lines += ["", f"Total run time: {format_seconds(total)}.", ""]
    machines = sorted({_describe_machine(manifest["machine"])
                       for manifest in manifests.values() if manifest.get("machine")})
    if machines:
        lines += [f"Machine{'s' if len(machines) > 1 else ''}: {'; '.join(machines)}.", ""]
    versions: dict[str, set[str]] = {}
    for manifest in manifests.values():
        for package, version in manifest.get("versions", {}).items():
            versions.setdefault(package, set()).add(version)
    if versions:
        lines += ["## Package versions", "", "| package | version |", "|---|---|"]
        lines += [f"| {package} | {', '.join(sorted(found))} |"
                  for package, found in sorted(versions.items())]
        if any(len(found) > 1 for found in versions.values()):
            lines += ["", "Some stages ran with different versions (listed together above)."]
    page = root / "book" / "status.md"
    page.write_text("\n".join(lines) + "\n")
    return page


def _describe_machine(machine: dict[str, Any]) -> str:
    parts = [machine.get("system"), machine.get("processor")]
    if machine.get("cpu_cores"):
        parts.append(f"{machine['cpu_cores']} CPU cores")
    return ", ".join(str(part) for part in parts if part and part != "unknown")


def _finished(manifest: dict[str, Any]) -> str:
    finished = manifest.get("finished")
    if not finished:
        return "not recorded"
    return datetime.fromisoformat(finished).strftime("%Y-%m-%d %H:%M")


def format_seconds(seconds: float) -> str:
    """Run time as a reader reads it.

    Examples
    --------
    >>> format_seconds(12.34), format_seconds(754), format_seconds(3725)
    ('12 s', '12 min 34 s', '1 h 2 min')
    """
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
