"""Run the study's stages with papermill, skip what is unchanged, and build the book.

``python -m moecollab run [--profile NAME|FILE] [-p key=value ...] [--from STAGE] [--only STAGE]
[--force]`` and ``python -m moecollab book [--profile NAME]``.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import appendix, artifacts, book, preflight, stream_text
from .params import (
    ParameterError,
    find_profile,
    load_profile,
    parse_override,
    profile_name,
    resolve,
    stage_parameters,
)
from .run_lock import ProfileBusy, profile_lock
from .stages import STAGE_NAMES, STAGES, Stage

logger = logging.getLogger("moecollab")
KERNEL_NAME = "moecollab"
# Every stage kernel loads moecollab.kernel_setup (inline figures whatever MPLBACKEND says,
# warning floods summarised). Errors only: ipykernel's notice that loopback TCP is unencrypted
# would otherwise print once per stage.
KERNEL_ARGUMENTS = ["--ext=moecollab.kernel_setup", "--IPKernelApp.log_level=ERROR"]
NOTEBOOK_SIZE_WARNING = 2_000_000  # bytes; a chapter above this is slow to download and read


class StageFailed(RuntimeError):
    """A notebook raised; the message is the failing cell's error, not papermill's traceback."""


@dataclass
class Plan:
    root: Path
    profile: str                         # artifacts are filed under this name
    parameters: dict[str, dict[str, Any]]
    stages: list[Stage]                  # the stages to run, in order
    artifacts_root: Path
    force: bool = False


def _package_dir(root: Path) -> Path:
    package = root / "src" / "moecollab"
    return package if package.is_dir() else Path(__file__).parent  # installed, no source tree


def _imported_modules(source: str, package: Path, current: Path | None = None) -> set[Path]:
    """Files of ``moecollab`` modules that ``source`` imports (absolute or relative imports)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level and current is not None:
                base = current.parent
                for _ in range(node.level - 1):
                    base = base.parent
                prefix = ".".join(base.relative_to(package.parent).parts)
                module = f"{prefix}.{node.module}" if node.module else prefix
            else:
                module = node.module or ""
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] != "moecollab":
                continue
            for end in range(1, len(parts) + 1):
                stem = package.parent.joinpath(*parts[:end])
                for candidate in (stem.with_suffix(".py"), stem / "__init__.py"):
                    if candidate.is_file():
                        found.add(candidate)
    return found


def source_hash(root: Path, notebook: Path) -> str:
    """One hash of the package modules a notebook uses, followed through their own imports.

    A change to code the stage runs re-runs it; a change elsewhere in the package does not.
    """
    package = _package_dir(root)
    import jupytext

    cells = jupytext.read(notebook).cells
    code = "\n".join(cell.source for cell in cells if cell.cell_type == "code"
                     and not cell.source.lstrip().startswith(("%", "!")))
    pending = _imported_modules(code, package) | {package / "__init__.py"}
    seen: set[Path] = set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        pending |= _imported_modules(path.read_text(), package, current=path) - seen
    return artifacts.text_sha256("".join(
        f"{path.relative_to(package)}:{artifacts.file_sha256(path)}\n" for path in sorted(seen)))


def make_plan(profile: str = "default", overrides: list[str] | None = None,
              from_stage: str | None = None, only: str | None = None, force: bool = False,
              root: Path | None = None, artifacts_root: Path | None = None) -> Plan:
    """Resolve and check every parameter before anything heavy runs."""
    root = root or artifacts.repo_root()
    for option, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in STAGE_NAMES:
            raise ParameterError(
                f"{option} {value!r} is not a stage; stages are: {', '.join(STAGE_NAMES)}")
    if from_stage and only:
        raise ParameterError("give --from or --only, not both")
    settings = load_profile(find_profile(profile, root))
    declared = {stage.name: stage_parameters(stage, root) for stage in STAGES}
    parameters = resolve(settings, [parse_override(text) for text in overrides or []], declared)
    artifacts_root = artifacts_root or root / "artifacts"
    if only:
        selected = [stage for stage in STAGES if stage.name == only]
    elif from_stage:
        selected = list(STAGES[STAGE_NAMES.index(from_stage):])
    else:
        selected = list(STAGES)
    preflight.check_plan(parameters, cache_dir=artifacts_root / profile_name(profile) / "cache",
                         stages=[stage.name for stage in selected])
    return Plan(root=root, profile=profile_name(profile), parameters=parameters,
                stages=selected, artifacts_root=artifacts_root,
                force=force)


def stage_key(plan: Plan, stage: Stage, inputs: dict[str, str]) -> str:
    """Everything that decides a stage's outputs, hashed."""
    notebook = artifacts.file_sha256(plan.root / stage.notebook)
    return artifacts.text_sha256(json.dumps({
        "stage": stage.name, "parameters": plan.parameters[stage.name], "inputs": inputs,
        "notebook": notebook, "source": source_hash(plan.root, plan.root / stage.notebook),
    }, sort_keys=True, default=str))


def upstream_hashes(plan: Plan, stage: Stage) -> dict[str, str]:
    """Output hashes of the stages this one reads; a clear error if one is missing or broken."""
    hashes = {}
    for needed in stage.needs:
        folder = plan.artifacts_root / plan.profile / needed
        try:
            hashes[needed] = artifacts.verify_stage(folder).outputs_hash
        except FileNotFoundError:
            raise artifacts.ArtifactError(
                f"stage {stage.name} needs stage {needed}, which has no finished artifacts "
                f"for profile {plan.profile!r}; run it first (drop --only/--from)") from None
    return hashes


def run(plan: Plan, wait: bool = False) -> list[str]:
    """Run the planned stages in order; return what happened to each ("ran"/"skipped").

    The profile is locked for the whole run: a second run of the same profile raises
    :class:`~moecollab.run_lock.ProfileBusy` naming the first, or waits for it (``wait``).
    """
    with profile_lock(plan.artifacts_root / plan.profile, wait=wait):
        return _run_locked(plan)


def _run_locked(plan: Plan) -> list[str]:
    outcomes = []
    for stage in plan.stages:
        inputs = upstream_hashes(plan, stage)
        key = stage_key(plan, stage, inputs)
        folder = plan.artifacts_root / plan.profile / stage.name
        if not plan.force and _is_current(folder, key, stage):
            logger.info("%s: unchanged (parameters, inputs and code), skipped", stage.name)
            outcomes.append("skipped")
            continue
        logger.info("%s: running %s", stage.name, stage.notebook)
        seconds = execute_stage(plan, stage, key, inputs)
        logger.info("%s: done in %.1f s", stage.name, seconds)
        outcomes.append("ran")
    return outcomes


def _is_current(folder: Path, key: str, stage: Stage) -> bool:
    try:
        manifest = artifacts.verify_stage(folder)
    except FileNotFoundError:
        return False
    except artifacts.ArtifactError as error:
        logger.warning("%s: %s; re-running the stage", stage.name, error)
        return False
    return manifest.key == key


def execute_stage(plan: Plan, stage: Stage, key: str, inputs: dict[str, str]) -> float:
    """Execute one notebook into a temporary folder, then move it into place with a manifest."""
    import jupytext
    import papermill

    final = plan.artifacts_root / plan.profile / stage.name
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final.parent, stage.name)
    work = Path(tempfile.mkdtemp(prefix=f".{stage.name}.partial-", dir=final.parent))
    executed = plan.artifacts_root / plan.profile / "executed" / f"{stage.name}.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    parameters = {**plan.parameters[stage.name], "profile": plan.profile,
                  "artifacts_root": str(plan.artifacts_root), "output_dir": str(work)}
    notebook = jupytext.read(plan.root / stage.notebook)
    started = time.perf_counter()
    try:
        with artifacts.atomic_path(executed) as tmp_executed:
            try:
                papermill.execute_notebook(
                    notebook, str(tmp_executed), parameters=parameters,
                    kernel_name=ensure_kernel(), cwd=str(plan.root), progress_bar=False,
                    log_output=logger.isEnabledFor(logging.DEBUG),
                    kernel_manager_class=quiet_kernel_manager(),
                    extra_arguments=KERNEL_ARGUMENTS,
                    coalesce_streams=True)  # one stream per cell
            except papermill.PapermillExecutionError as error:
                _lighten(plan, stage, tmp_executed)
                shutil.copyfile(tmp_executed, executed)  # keep the failing copy to read
                raise StageFailed(_describe_failure(stage, error, executed)) from None
            _lighten(plan, stage, tmp_executed)
        seconds = time.perf_counter() - started
        _warn_if_heavy(stage, executed)
        manifest = artifacts.Manifest(
            stage=stage.name, profile=plan.profile, key=key,
            parameters=plan.parameters[stage.name], inputs=inputs,
            outputs=artifacts.hash_files(work), seconds=round(seconds, 2),
            finished=datetime.now(UTC).isoformat(timespec="seconds"),
            machine=artifacts.machine_summary())
        manifest.save(work)
        artifacts.replace_folder(work, final)
        return seconds
    finally:
        if work.exists():
            shutil.rmtree(work)


def _remove_leftovers(profile_folder: Path, stage: str) -> None:
    """Delete what a killed run left behind: partial stage folders and temporary notebooks.

    Called only while this process holds the profile's run lock, so no live run owns them.
    """
    leftovers = [*profile_folder.glob(f".{stage}.partial-*"),
                 *(profile_folder / "executed").glob(f".{stage}.*.tmp.ipynb")]
    for path in leftovers:
        logger.info("%s: removing %s left by a run that has ended", stage, path.name)
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _lighten(plan: Plan, stage: Stage, notebook_path: Path) -> None:
    """Store printed text as a terminal shows it, floods shortened; the whole text goes to
    ``artifacts/<profile>/logs/<stage>.log`` (see :mod:`moecollab.stream_text`)."""
    import nbformat

    log = plan.artifacts_root / plan.profile / "logs" / f"{stage.name}.log"
    try:
        shown = log.relative_to(plan.root).as_posix()
    except ValueError:
        shown = f"artifacts/{plan.profile}/logs/{stage.name}.log"
    notebook = nbformat.read(notebook_path, as_version=4)
    text = stream_text.lighten_notebook(notebook, shown)
    nbformat.write(notebook, notebook_path)
    with artifacts.atomic_path(log) as tmp:
        tmp.write_text(text)


def _warn_if_heavy(stage: Stage, executed: Path) -> None:
    size = executed.stat().st_size
    if size > NOTEBOOK_SIZE_WARNING:
        logger.warning("%s: the executed notebook is %.1f MB (over %.0f MB); look for a cell "
                       "that prints or displays too much", stage.name, size / 1e6,
                       NOTEBOOK_SIZE_WARNING / 1e6)


def _describe_failure(stage: Stage, error, executed: Path) -> str:
    source = (error.source or "").strip().splitlines()
    excerpt = "\n".join(f"    {line}" for line in source[-6:])
    return (f"stage {stage.name} failed in cell {error.exec_count}: {error.ename}: "
            f"{error.evalue}\n  cell source (last lines):\n{excerpt}\n"
            f"  executed notebook kept at {executed}")


def quiet_kernel_manager() -> type:
    """jupyter_client's kernel manager, minus the SIGINT it sends before every shutdown.

    ``shutdown_kernel`` interrupts the kernel first, in case a cell is still running. Ours have
    finished (or failed) by then; an interrupt that lands while the kernel is still handling
    its last message makes ipykernel log "KeyboardInterrupt caught in kernel" on the terminal
    although the stage succeeded. A kernel that does not stop at the shutdown request is still
    terminated, then killed, by the manager.
    """
    from jupyter_client.manager import AsyncKernelManager

    class QuietShutdownKernelManager(AsyncKernelManager):
        async def _async_interrupt_kernel(self) -> None:
            if self.shutting_down:
                return
            await super()._async_interrupt_kernel()

    return QuietShutdownKernelManager


def ensure_kernel() -> str:
    """A kernelspec pinned to this Python, so papermill never picks up a stale user kernel."""
    # Look in this environment's share/jupyter before the user's, so a kernel of the same name
    # left by another checkout cannot take over.
    os.environ["JUPYTER_PREFER_ENV_PATH"] = "1"
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().get_all_specs()
    spec = specs.get(KERNEL_NAME, {}).get("spec", {})
    if spec.get("argv", [None])[0] != sys.executable:
        from ipykernel.kernelspec import install

        install(kernel_name=KERNEL_NAME, display_name="moecollab", prefix=sys.prefix)
    return KERNEL_NAME


# --------------------------------------------------------------------------------------- book

def build_book(profile: str = "default", root: Path | None = None,
               artifacts_root: Path | None = None, strict: bool = True,
               output_dir: Path | None = None, builder: str = "html") -> Path:
    """Copy a profile's executed notebooks into ``book/notebooks`` and build the book.

    The build renders papermill's outputs as they are (``execute_notebooks: "off"``).
    ``builder`` is ``html`` (returns the index page), ``latex`` (the ``.tex`` source, no TeX
    needed) or ``pdf`` (XeLaTeX through latexmk, which ``make pdf`` installs; returns the PDF).
    """
    import nbformat

    if builder not in BUILDERS:
        raise ParameterError(f"builder must be one of {', '.join(BUILDERS)}; got {builder!r}")
    root = root or artifacts.repo_root()
    name = profile_name(profile)
    artifacts_root = artifacts_root or root / "artifacts"
    executed = artifacts_root / name / "executed"
    manifests = book.load_manifests(artifacts_root / name)
    chapters = root / book.NOTEBOOK_FOLDER
    if chapters.exists():
        shutil.rmtree(chapters)
    chapters.mkdir(parents=True)
    for stage in STAGES:
        source = executed / f"{stage.name}.ipynb"
        if not source.is_file():
            raise artifacts.ArtifactError(
                f"no executed notebook for stage {stage.name} in {executed}; run: "
                f"python -m moecollab run --profile {profile}")
        notebook = nbformat.read(source, as_version=4)
        if notebook.metadata.get("papermill", {}).get("exception"):
            raise StageFailed(f"the executed notebook {source} ended with an error; re-run "
                              f"the stage before building the book")
        chapter = book.chapter_notebook(notebook, stage, manifests.get(stage.name), root=root,
                                        artifacts_root=artifacts_root, profile=name)
        nbformat.write(chapter, chapters / source.name)
    book.write_downloads_page(root, artifacts_root / name)
    book.write_status_page(root, name, manifests)
    appendix.write_appendix_parts(root, artifacts_root / name)
    # Jupyter Book 1's command sits beside this Python (never `jupyter book`, which is JB2's).
    command = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(root), "--all",
               "-q"]
    if builder == "pdf":
        missing = [tool for tool in ("xelatex", "latexmk") if shutil.which(tool) is None]
        if missing:
            raise StageFailed(f"the PDF needs TeX ({', '.join(missing)} not found); run "
                              "`make pdf`, which installs it from Debian packages")
    command += ["--builder", BUILDERS[builder]]
    if strict:
        command += ["-W", "--keep-going"]
    if output_dir is not None:
        command += ["--path-output", str(output_dir)]
    if subprocess.run(command, cwd=root).returncode != 0:
        raise StageFailed("the book build failed (see the warnings above)")
    if builder == "html":
        return (output_dir or root) / "_build" / "html" / "index.html"
    suffix = "tex" if builder == "latex" else "pdf"
    return (output_dir or root) / "_build" / "latex" / f"moecollab.{suffix}"


BUILDERS = {"html": "html", "latex": "latex", "pdf": "pdflatex"}  # ours → Jupyter Book's
GENERATED_PAGES = book.GENERATED_PAGES  # written by build_book, listed in _toc.yml
# book/generated/ holds the parts that book/appendix.md includes (moecollab.appendix).


# ---------------------------------------------------------------------------------------- CLI

def _stage_help(root: Path) -> str:
    lines = ["stages and their parameters (defaults from the notebooks):"]
    for stage in STAGES:
        lines.append(f"\n  {stage.name}  {stage.title}")
        try:
            declared = stage_parameters(stage, root)
        except ParameterError as error:
            lines.append(f"    ({error})")
            continue
        checks = stage.all_checks()
        for name, parameter in declared.items():
            if name in ("profile", "artifacts_root", "output_dir"):
                continue
            allowed = f" [{checks[name].describe()}]" if name in checks else ""
            lines.append(f"    {parameter.describe()}{allowed}")
    return "\n".join(lines)


def build_parser(root: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moecollab",
        description="Run the moecollab study stage by stage and build its book.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_stage_help(root))
    parser.add_argument("-v", "--verbose", action="store_true", help="show notebook output")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser(
        "run", help="run the stages of a profile", epilog=_stage_help(root),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run_parser.add_argument("--profile", default="default",
                            help="profile name in notebooks/params/ or a YAML file")
    run_parser.add_argument("-p", dest="overrides", action="append", default=[],
                            metavar="KEY=VALUE",
                            help="override a parameter (or STAGE.KEY=VALUE); repeatable")
    run_parser.add_argument("--from", dest="from_stage", metavar="STAGE",
                            help="run this stage and every later one")
    run_parser.add_argument("--only", metavar="STAGE", help="run just this stage")
    run_parser.add_argument("--force", action="store_true",
                            help="re-run the selected stages even when unchanged")
    run_parser.add_argument("--wait", action="store_true",
                            help="if another run is writing this profile, wait for it to end "
                                 "(default: stop with a message naming it)")
    book_parser = commands.add_parser("book", help="build the book from executed notebooks")
    book_parser.add_argument("--profile", default="default")
    book_parser.add_argument("--no-strict", dest="strict", action="store_false",
                             help="do not turn Sphinx warnings into errors")
    book_parser.add_argument("--pdf", action="store_true",
                             help="build a PDF through LaTeX instead of HTML (needs TeX)")
    return parser


def main(argv: list[str] | None = None) -> int:
    root = artifacts.repo_root()
    args = build_parser(root).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    for noisy in ("papermill", "traitlets", "asyncio", "blib2to3", "nbclient"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "run":
            plan = make_plan(args.profile, args.overrides, args.from_stage, args.only,
                             args.force, root=root)
            run(plan, wait=args.wait)
            logger.info("artifacts in %s", plan.artifacts_root / plan.profile)
        else:
            index = build_book(args.profile, root=root, strict=args.strict,
                               builder="pdf" if args.pdf else "html")
            logger.info("book: %s", index)
    except (ParameterError, artifacts.ArtifactError, StageFailed, ProfileBusy) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ParameterError) else 1
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept, the next run resumes", file=sys.stderr)
        return 130
    return 0
