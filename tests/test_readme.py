"""The README's examples run as written.

Every ```python block of README.md is preceded by a marker comment.  ``<!-- readme-test: run -->`` blocks
are executed here: on a CPU the root conftest sets ``TRITON_INTERPRET=1``, so the kernels snippet runs the
Triton kernels in the interpreter; on a GPU machine it runs them on CUDA.  ``<!-- readme-test: skip (reason)
-->`` blocks need something this test cannot have (a local SD3.5 pipeline) and are only compiled.  The
README's two commands, which CI relies on, must appear verbatim, the options of every ``python -m`` command
of its bash blocks must parse with that module's parser, and its links into the repository must resolve.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

MAIN_COMMAND = "pip install torch==2.13.0 && pip install -e . && python -m train.nft"
TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest -q -n auto'

_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_MARKER = re.compile(r"<!-- readme-test: (run|skip)( \(([^)]*)\))? -->\s*$")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, mode, code)`` for every python block; ``mode`` is ``run``, ``skip`` or None (no marker)."""
    out = []
    for m in _BLOCK.finditer(text):
        if m.group(1) != "python":
            continue
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        out.append((line, marker.group(1) if marker else None, m.group(2)))
    return out


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))
RUN = [(line, code) for line, mode, code in BLOCKS if mode == "run"]


def test_every_python_block_is_marked():
    unmarked = [line for line, mode, _ in BLOCKS if mode is None]
    assert not unmarked, (
        f"README.md python blocks at lines {unmarked}: expected a '<!-- readme-test: run -->' or "
        "'<!-- readme-test: skip (reason) -->' line right before each"
    )
    assert any("import kernels" in code for _, code in RUN), "the kernels snippet must be marked to run"


@pytest.mark.parametrize("line, code", RUN, ids=[f"README.md:{line}" for line, _ in RUN])
def test_python_block_runs(line, code):
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize(
    "line, code",
    [(line, code) for line, mode, code in BLOCKS if mode == "skip"],
    ids=[f"README.md:{line}" for line, mode, _ in BLOCKS if mode == "skip"],
)
def test_skipped_python_block_compiles(line, code):
    compile(code, f"README.md:{line}", "exec")


def test_the_two_commands_are_verbatim():
    text = README.read_text(encoding="utf-8")
    assert MAIN_COMMAND in text
    assert TEST_COMMAND in text


def test_links_resolve():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", text)
    assert targets, "expected links into docs/"
    missing = sorted({t for t in targets if not (ROOT / t).exists()})
    assert not missing, f"README.md links to files that do not exist: {missing}"


def _slugs(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    fence = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fence = not fence
        m = None if fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_link_anchors_resolve():
    """Every ``file.md#anchor`` (or ``#anchor``) link of the README and of docs/*.md names a heading of that
    file."""
    bad = []
    for doc in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#:\s]*)#([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            path = doc.parent / target if target else doc
            if not path.is_file() or anchor not in _slugs(path.read_text(encoding="utf-8")):
                bad.append(f"{doc.relative_to(ROOT)}: {target}#{anchor}")
    assert not bad, f"links to headings that do not exist: {bad}"


class _Parsed(BaseException):
    """Raised where a command's options have parsed, so nothing after the parse runs."""


def shell_commands(text: str) -> list[tuple[int, str, list[str]]]:
    """``(line, module, argv)`` for every ``python -m train.X`` / ``bench.X`` (or ``torchrun ... -m``) command
    of the bash blocks: continuation lines joined, comments dropped, ``&&`` / ``;`` / ``|`` chains split."""
    out = []
    for m in _BLOCK.finditer(text):
        if m.group(1) not in ("bash", ""):
            continue
        line = text.count("\n", 0, m.start()) + 1
        for cmd in m.group(2).replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;|\|", cmd):
                found = re.search(r"(?:python|torchrun)\b[^#]*?-m ((?:train|bench)\.[\w.]+)([^#]*)", part)
                if found:
                    args = found.group(2).strip().removesuffix("&").strip()
                    out.append((line, found.group(1), shlex.split(args)))
    return out


# Its main hands the arguments to pytest and runs the benchmark suite: no parse to stop at.
PYTEST_DRIVEN = {"bench.bench_kernels"}
COMMANDS = [c for c in shell_commands(README.read_text(encoding="utf-8")) if c[1] not in PYTEST_DRIVEN]


def test_the_commands_are_found():
    modules = {module for _, module, _ in COMMANDS}
    assert {"train.nft", "train.grpo", "train.ddpo", "train.dpo", "train.draft", "train.nabla_gfn"} <= modules
    assert len(COMMANDS) > 30, COMMANDS


@pytest.mark.parametrize(
    "module, argv", [c[1:] for c in COMMANDS], ids=[f"README.md:{c[0]}:{c[1]}" for c in COMMANDS]
)
def test_shell_command_options_parse(monkeypatch, module, argv):
    """Each command's options parse with its module's own parser (a renamed or removed option in the code
    fails here).  Only the parse: paths such as ``/models/sd3.5-medium`` are the user's."""
    import argparse

    import train.config
    import train.loop

    real_cli, real_args = train.config.parse_cli, argparse.ArgumentParser.parse_args

    def parse_cli(*args, **kwargs):
        real_cli(*args, **kwargs)
        raise _Parsed

    def parse_args(self, *args, **kwargs):
        real_args(self, *args, **kwargs)
        raise _Parsed

    mod = importlib.import_module(module)
    for owner in (train.config, train.loop, mod):
        if hasattr(owner, "parse_cli"):
            monkeypatch.setattr(owner, "parse_cli", parse_cli)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    try:
        rc = mod.main(argv)
    except _Parsed:
        return
    except SystemExit as e:  # argparse's usage error
        rc = e.code
    pytest.fail(f"python -m {module} {shlex.join(argv)}: its options did not parse (exit {rc})")
