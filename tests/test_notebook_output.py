"""What a stage notebook stores: figures as PNG whatever the backend, light and quiet output.

One fake stage runs through the real runner (papermill and a kernel) with ``MPLBACKEND=Agg``,
as the Makefile and CI set it; the glue test runs in this process and takes well under a second.
"""

import base64
import contextlib
import os
import signal
import time

import matplotlib
import nbformat
import pytest

from moecollab import notebook, params, runner, stages
from moecollab.kernel_setup import WarningSummary, short_path
from moecollab.stages import Stage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_glueing_a_figure_stores_a_png_under_the_agg_backend(monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    monkeypatch.setenv("MPLBACKEND", "Agg")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    InteractiveShell.instance()
    figure, axis = plt.subplots()
    axis.plot([0, 1], [1, 0])
    axis.set_title("A line")
    with capture_output() as captured:
        notebook.glue("fig_line", figure, display=False)
    (output,) = captured.outputs
    png = base64.b64decode(output.data[notebook.GLUE_PREFIX + "image/png"])
    assert png.startswith(PNG_SIGNATURE)
    # The text form names the figure; matplotlib's "<Figure size …>" repr never reaches a page.
    assert output.data[notebook.GLUE_PREFIX + "text/plain"] == "Figure: A line"
    assert output.metadata["scrapbook"] == {"name": "fig_line",
                                            "mime_prefix": notebook.GLUE_PREFIX}
    assert not plt.get_fignums()  # closed, so the inline backend cannot show it again


def test_a_saved_figure_carries_its_data_file_into_the_glued_output(tmp_path):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    from moecollab import artifacts

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    InteractiveShell.instance()
    figure, axis = plt.subplots()
    axis.bar(["a", "b"], [3, 5])
    artifacts.save_figure(tmp_path / "counts.png", figure)
    assert (tmp_path / "counts.csv").read_text().splitlines()[1:] == [
        "panel 1,bar,,a,3.0,,,", "panel 1,bar,,b,5.0,,,"]
    with capture_output() as captured:
        notebook.glue("fig_counts", figure)
    assert captured.outputs[0].metadata["moecollab"] == {"data": "counts.csv"}


def test_a_warning_flood_is_summarised_in_one_line():
    import io
    import warnings

    stream = io.StringIO()
    summary = WarningSummary(stream)
    for gap in range(500):
        summary.showwarning(UserWarning(f"did not converge, gap {gap}"), UserWarning,
                            "/opt/env/lib/python3.11/site-packages/solver/fit.py", 7)
    summary.showwarning(UserWarning("other"), UserWarning, "/opt/study/src/moecollab/x.py", 9)
    summary.report()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "solver/fit.py:7: UserWarning: did not converge, gap 0"
    assert lines[1] == "moecollab/x.py:9: UserWarning: other"
    assert lines[2] == "... and 499 more UserWarning from solver/fit.py:7 in this cell (not shown)"
    assert len(lines) == 3
    summary.report()  # a new cell starts afresh
    summary.showwarning(UserWarning("again"), UserWarning, "a.py", 1)
    assert stream.getvalue().splitlines()[-1] == "a.py:1: UserWarning: again"
    assert warnings.showwarning is not summary.showwarning  # nothing global in this test


@pytest.mark.parametrize(("path", "short"), [
    ("/home/x/.venv/lib/python3.11/site-packages/sklearn/a.py", "sklearn/a.py"),
    ("/usr/lib/python3/dist-packages/numpy/b.py", "numpy/b.py"),
    ("/somewhere/else/c.py", "c.py"),
])
def test_warning_paths_lose_the_machine_specific_part(path, short):
    assert short_path(path) == short


STAGE_NOTEBOOK = '''---
kernelspec:
  display_name: Python 3
  language: python
  name: python3
jupytext:
  text_representation:
    extension: .md
    format_name: myst
---

# Output

```{code-cell} ipython3
:tags: [parameters]

profile: str = "default"     # set by the runner
artifacts_root: str = "artifacts"  # set by the runner
output_dir: str = ""         # set by the runner
signal_file: str = ""        # a child process writes here if it receives SIGINT
seed: int = 0                # unused
```

```{code-cell} ipython3
import subprocess, sys, warnings
import matplotlib.pyplot as plt
from pathlib import Path
for step in range(2000):
    warnings.warn(f"step {step} did not converge", UserWarning)
for line in range(300):
    print(f"progress {line}", end="\\r", file=sys.stderr)
print(file=sys.stderr)  # as a progress bar does when it closes
for item in range(1000):
    print(f"item {item}")
figure, axis = plt.subplots()
axis.plot([0, 1], [1, 0])
Path(output_dir, "done.txt").write_text("ok")
# A child in the kernel's process group: it records any SIGINT sent to the group.
child = subprocess.Popen([sys.executable, "-c", (
    "import signal, sys, time\\n"
    "signal.signal(signal.SIGINT, lambda *_: open(sys.argv[1], 'w').write('SIGINT'))\\n"
    "print('ready', flush=True)\\n"
    "time.sleep(60)\\n"), signal_file], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "ready\\n"
print(child.pid)
```
'''


@pytest.fixture
def output_stage(tmp_path, monkeypatch):
    fake = (Stage("20_output", "Output"),)
    (tmp_path / "notebooks" / "params").mkdir(parents=True)
    (tmp_path / fake[0].notebook).write_text(STAGE_NOTEBOOK)
    (tmp_path / "notebooks" / "params" / "tiny.yml").write_text(
        f"signal_file: {tmp_path / 'signal.txt'}\n")
    for module in (runner, params, stages):
        monkeypatch.setattr(module, "STAGES", fake, raising=False)
        monkeypatch.setattr(module, "STAGE_NAMES", ("20_output",), raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return tmp_path


def test_a_stage_kernel_stores_figures_summarises_warnings_and_is_not_interrupted(
        output_stage, capfd):
    plan = runner.make_plan("tiny", root=output_stage)
    assert runner.run(plan) == ["ran"]
    executed = nbformat.read(output_stage / "artifacts/tiny/executed/20_output.ipynb", 4)
    outputs = executed.cells[-1].outputs
    child_pid = int(next(o.text for o in outputs if o.get("name") == "stdout").split()[-1])
    time.sleep(0.5)  # a late signal would have arrived by now
    signalled = (output_stage / "signal.txt").exists()
    with contextlib.suppress(ProcessLookupError):  # the kernel's group may be gone already
        os.kill(child_pid, signal.SIGKILL)
    assert not signalled, "the kernel's process group got a SIGINT at shutdown"
    assert "KeyboardInterrupt" not in capfd.readouterr().err

    assert any("image/png" in o.get("data", {}) for o in outputs), outputs
    (stderr,) = [o for o in outputs if o.get("name") == "stderr"]  # one stream per cell
    lines = stderr.text.splitlines()
    assert lines[0].endswith("UserWarning: step 0 did not converge")
    assert "1,999 more UserWarning" in stderr.text
    assert "progress 299" in stderr.text and "progress 298" not in stderr.text
    assert len(lines) < 10
    (stdout,) = [o for o in outputs if o.get("name") == "stdout"]
    assert stdout.text.startswith("item 0\nitem 1\n") and len(stdout.text.splitlines()) < 250
    assert ("more lines not stored here (the whole text is in artifacts/tiny/logs/20_output.log)"
            in stdout.text)
    log = (output_stage / "artifacts/tiny/logs/20_output.log").read_text()
    assert "item 500\n" in log and "progress 298" not in log
