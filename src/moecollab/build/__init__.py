"""One-off tools that make the committed inputs in ``data/``; the study never imports them.

``python -m moecollab.build.corpus`` builds the embedded domain corpus from Debian's
dictionary packages (and ``--check`` compares a rebuild with ``data/PROVENANCE.json``). The
runtime package reads only what they wrote (:mod:`moecollab.data`); a test keeps it that way.
"""
