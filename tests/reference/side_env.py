"""The side environment that runs DeepSeek-MoE's original code: transformers 4.x, its own venv.

The original ``modeling_deepseek.py`` of ``deepseek-ai/deepseek-moe-16b-base`` imports
``transformers.modeling_attn_mask_utils`` and other helpers that transformers 5 removed, so it
runs in a separate virtual environment with :data:`TRANSFORMERS_VERSION` and the project's torch,
never inside the package. Both live under ``.reference/`` (git-ignored):

- ``.reference/venv/``: ``python -m venv`` + ``pip install torch==<the project's>
  transformers==4.46.3 safetensors`` (pip's own configuration decides the index: set
  ``PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu`` for the CPU build of torch);
- ``.reference/deepseek-moe-16b-base/``: the original ``configuration_deepseek.py`` and
  ``modeling_deepseek.py``, which are not copied into this repository. They are taken from
  ``$MOECOLLAB_DEEPSEEK_V1_CODE`` (a folder holding both), else downloaded from the hub
  repository, else from a public GitHub copy of it, and accepted only if their git blob hashes
  equal :data:`ORIGINAL_FILES` (the hashes of the files in the hub repository, which three
  independent public copies agree on).

``python tests/reference/side_env.py`` (also ``make reference-env``) builds both and says what
it did; tests call :func:`ensure`, which builds what is missing or returns why it cannot.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_DIR = ROOT / ".reference"
VENV = REFERENCE_DIR / "venv"
CODE_DIR = REFERENCE_DIR / "deepseek-moe-16b-base"
CODE_ENV = "MOECOLLAB_DEEPSEEK_V1_CODE"
#: transformers 4.46.3 is the newest 4.x release tested to import the original code with torch
#: 2.13 (it still has every helper the code imports) and to run it unchanged.
TRANSFORMERS_VERSION = "4.46.3"
HUB_REPO = "deepseek-ai/deepseek-moe-16b-base"
#: Git blob SHA-1 of the original files (the hub repository's own object ids).
ORIGINAL_FILES = {
    "configuration_deepseek.py": "dae9e620cb4ee9fc615f422b687c290394141b39",
    "modeling_deepseek.py": "af8d5141fe402becdf72e655b03cce0aee340ae2",
}
_GITHUB_COPY = ("https://raw.githubusercontent.com/dpiresearch/grokipedia-mobile/"
                "748147055becbedbfa67cd5418d3a3278e927174/paper-manim-viz-explanations/"
                "deepseek-moe-explainer/deepseek-code/{name}")
_SOURCES = (f"https://huggingface.co/{HUB_REPO}/resolve/main/{{name}}", _GITHUB_COPY)


def git_blob_sha1(data: bytes) -> str:
    """The id git (and the hub) give a file's content.

    Examples
    --------
    >>> git_blob_sha1(b"hello\\n")  # git hash-object of a file holding "hello" and a newline
    'ce013625030ba8dba906f756967f9e9ca394464a'
    """
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _verified(folder: Path) -> bool:
    return all((folder / name).is_file()
               and git_blob_sha1((folder / name).read_bytes()) == sha
               for name, sha in ORIGINAL_FILES.items())


def fetch_code() -> tuple[Path | None, str]:
    """The folder with the verified original code, fetching it if needed; or None and why."""
    if _verified(CODE_DIR):
        return CODE_DIR, f"original code in {CODE_DIR}"
    CODE_DIR.mkdir(parents=True, exist_ok=True)
    given = os.environ.get(CODE_ENV)
    reasons = []
    for name, sha in ORIGINAL_FILES.items():
        data = None
        if given:
            candidate = Path(given) / name
            if candidate.is_file() and git_blob_sha1(candidate.read_bytes()) == sha:
                data = candidate.read_bytes()
            else:
                reasons.append(f"${CODE_ENV}/{name} is missing or not the original")
        for url in () if data else _SOURCES:
            try:
                with urllib.request.urlopen(url.format(name=name), timeout=30) as response:
                    body = response.read()
            except OSError as error:
                reasons.append(f"{url.format(name=name)}: {error}")
                continue
            if git_blob_sha1(body) == sha:
                data = body
                break
            reasons.append(f"{url.format(name=name)}: content differs from the original")
        if data is None:
            return None, "; ".join(reasons)
        (CODE_DIR / name).write_bytes(data)
    return CODE_DIR, f"original code fetched into {CODE_DIR}"


def python() -> Path:
    return VENV / "bin" / "python"


def _venv_ready() -> bool:
    if not python().is_file():
        return False
    probe = subprocess.run(
        [str(python()), "-c", "import transformers, torch, safetensors; "
         "print(transformers.__version__)"], capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() == TRANSFORMERS_VERSION


def build_venv() -> tuple[bool, str]:
    """Create the side venv (a few minutes: torch is the bulk); True, or False and why."""
    if _venv_ready():
        return True, f"side environment ready in {VENV}"
    from importlib.metadata import version

    torch_version = version("torch").split("+")[0]
    commands = [[sys.executable, "-m", "venv", "--clear", str(VENV)],
                [str(python()), "-m", "pip", "install", "-q", f"torch=={torch_version}",
                 f"transformers=={TRANSFORMERS_VERSION}", "safetensors", "numpy"]]
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            return False, f"{' '.join(command[:4])} failed: {lines[-1] if lines else '?'}"
    if not _venv_ready():
        return False, f"{VENV} was built but does not import transformers {TRANSFORMERS_VERSION}"
    return True, f"side environment built in {VENV}"


def ensure() -> tuple[Path | None, Path | None, str]:
    """(side python, original code folder, what happened); Nones and the reason if either
    cannot be had."""
    code, code_note = fetch_code()
    if code is None:
        return None, None, f"the original DeepSeek-MoE code could not be fetched ({code_note})"
    ready, venv_note = build_venv()
    if not ready:
        return None, None, f"the side environment could not be built ({venv_note})"
    return python(), code, f"{venv_note}; {code_note}"


def run_original(checkpoint: Path, inputs: Path, output: Path, *, dtype: str = "float32"):
    """Run ``deepseek_v1_original.py`` in the side environment (raises on failure)."""
    side_python, code, note = ensure()
    if side_python is None:
        raise RuntimeError(note)
    script = Path(__file__).with_name("deepseek_v1_original.py")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                   "HF_MODULES_CACHE": str(output.parent / "modules")}
    result = subprocess.run(
        [str(side_python), str(script), "--checkpoint", str(checkpoint), "--code", str(code),
         "--inputs", str(inputs), "--output", str(output), "--dtype", dtype],
        capture_output=True, text=True, env=environment, cwd=output.parent)
    if result.returncode != 0:
        raise RuntimeError(f"the original code failed in the side environment:\n"
                           f"{result.stderr[-3000:]}")


if __name__ == "__main__":
    side_python, code, note = ensure()
    print(note)
    raise SystemExit(0 if side_python else 1)
