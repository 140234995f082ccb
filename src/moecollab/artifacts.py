"""The artifact contract: stage folders, manifests, hashes and atomic writes.

Every stage writes ``artifacts/<profile>/<stage>/`` and, once its notebook has run to the end,
a ``manifest.json`` that records the stage's parameters, the hashes of its inputs and outputs,
package versions and the time taken. The runner executes a stage into a temporary sibling
folder and renames it into place only on success, so no stage ever reads a partial artifact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# Packages whose versions decide the numbers a stage produces.
RECORDED_PACKAGES = (
    "moecollab", "torch", "transformers", "tokenizers", "numpy", "scipy", "scikit-learn",
    "pandas", "lm-eval", "safetensors", "papermill",
)


class ArtifactError(RuntimeError):
    """An artifact is missing, partial or does not match its manifest."""


def repo_root() -> Path:
    """The project folder: the nearest parent of the working directory with a pyproject.toml.

    Falls back to the folder above ``src/`` when the package is used from a source checkout.
    """
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / "pyproject.toml").is_file() and (folder / "src" / "moecollab").is_dir():
            return folder
    return Path(__file__).resolve().parents[2]


def stage_dir(profile: str, stage: str, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<profile>/<stage>``; ``root`` defaults to ``<repo>/artifacts``."""
    root_path = Path(root) if root else repo_root() / "artifacts"
    return root_path / profile / stage


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_files(folder: str | os.PathLike, exclude: tuple[str, ...] = (MANIFEST_NAME,)
               ) -> dict[str, str]:
    """Relative path → SHA-256 for every file below ``folder`` (sorted, ``exclude`` skipped)."""
    folder = Path(folder)
    hashes = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and relative not in exclude:
            hashes[relative] = file_sha256(path)
    return hashes


def package_versions(names: tuple[str, ...] = RECORDED_PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def machine_summary() -> dict[str, Any]:
    """What a reader needs to judge a run time: operating system, processor, cores."""
    return {"system": f"{platform.system()} {platform.machine()}",
            "processor": _processor_name(), "cpu_cores": os.cpu_count()}


def _processor_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")  # Linux; platform.processor() is empty there
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "table.csv"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("a,b\\n1,2\\n")
    >>> target.read_text()
    'a,b\\n1,2\\n'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the suffix: some writers (papermill, pandas) choose a format by it.
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}",
                                        dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_table(path: str | os.PathLike, table) -> Path:
    """Write a pandas DataFrame as CSV (``.csv``) or Parquet (``.parquet``), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            table.to_csv(tmp, index=False)
        elif path.suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            raise ValueError(f"table path must end in .csv or .parquet; got {path.name!r}")
    return path


def save_figure(path: str | os.PathLike, figure, dpi: int = 110, data=None) -> Path:
    """Save a matplotlib figure as PNG, and its data as a CSV of the same name beside it.

    The PNG is written atomically with fixed metadata (byte-stable reruns). The CSV is, in
    order of preference: ``data`` (a DataFrame) when given; a CSV of the same name that the
    stage already wrote (``load_balance.csv`` for ``load_balance.png``); otherwise every value
    the figure draws, read back from it (:func:`moecollab.figure_data.figure_table`). Its name
    is remembered on the figure, so that :func:`moecollab.notebook.glue` lets the book link it
    under the figure. A figure that draws no data (a message) gets no CSV.
    """
    from .figure_data import figure_table
    from .notebook import DATA_ATTRIBUTE

    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight",
                       metadata={"Software": None})
    table_path = path.with_suffix(".csv")
    if data is None and not table_path.is_file():
        data = figure_table(figure)
    if data is not None and not data.empty:
        write_table(table_path, data)
    if table_path.is_file():
        setattr(figure, DATA_ATTRIBUTE, table_path.name)
    return path


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, paths
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


@dataclass
class Manifest:
    """What a finished stage folder holds and what produced it."""

    stage: str
    profile: str
    key: str                       # hash of everything that decides the outputs
    parameters: dict[str, Any]
    inputs: dict[str, str]         # upstream stage → hash of its manifest's outputs
    outputs: dict[str, str]        # relative path → SHA-256
    versions: dict[str, str] = field(default_factory=package_versions)
    seconds: float = 0.0
    finished: str = ""             # when the stage finished, ISO 8601 in UTC
    machine: dict[str, Any] = field(default_factory=dict)  # machine_summary() of the run
    manifest_version: int = MANIFEST_VERSION

    def save(self, folder: str | os.PathLike) -> Path:
        return write_json(Path(folder) / MANIFEST_NAME, self.__dict__)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        try:
            fields = read_json(path)
            return cls(**fields)
        except FileNotFoundError:
            raise
        except (json.JSONDecodeError, TypeError) as error:
            raise ArtifactError(f"{path} is not a valid manifest ({error})") from None

    @property
    def outputs_hash(self) -> str:
        """One hash of all outputs: what downstream stages record as their input."""
        return text_sha256(json.dumps(self.outputs, sort_keys=True))


def verify_stage(folder: str | os.PathLike) -> Manifest:
    """Check a stage folder against its manifest and return the manifest.

    Raises
    ------
    FileNotFoundError
        When the folder has no manifest (the stage never finished).
    ArtifactError
        When a file is missing, added, or its bytes differ from the hash in the manifest.
    """
    folder = Path(folder)
    manifest = Manifest.load(folder)
    actual = hash_files(folder)
    for relative, expected in manifest.outputs.items():
        if relative not in actual:
            raise ArtifactError(f"{folder / relative} is missing (listed in its manifest)")
        if actual[relative] != expected:
            raise ArtifactError(
                f"{folder / relative} does not match its manifest (hash mismatch: "
                "corrupted, truncated or edited by hand)")
    extra = sorted(set(actual) - set(manifest.outputs))
    if extra:
        raise ArtifactError(f"{folder / extra[0]} is not listed in its manifest")
    return manifest


def load_stage(profile: str, stage: str, root: str | os.PathLike | None = None) -> Path:
    """The verified folder of a finished stage; a clear error naming the stage to run if not."""
    folder = stage_dir(profile, stage, root)
    try:
        verify_stage(folder)
    except FileNotFoundError:
        raise ArtifactError(
            f"stage {stage} has no finished artifacts for profile {profile!r} in {folder}; "
            f"run: python -m moecollab run --profile {profile} --only {stage}") from None
    return folder


def replace_folder(source: Path, target: Path) -> None:
    """Move a finished temporary stage folder into place, replacing an older one."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
