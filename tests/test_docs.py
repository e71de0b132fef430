"""Every command block of README.md and docs/*.md, run as written.

Each fenced block in those files follows a marker, `<!-- docs-test: KIND -->` on the line before it, that says
what this test does with it:

- `run`: every line runs, in order, in one sandbox folder shared by the whole module (README.md first, then
  docs/ by name), so a block may use what an earlier one made (`prompts.parquet`, `models/tiny`, `out/`; a test
  run alone runs the earlier `run` and spec blocks first). A
  `fluxbatch` line runs in this process (`jobs.cli.main`, the stand-in renderer, the session's Ray cluster; the
  model and a cold Ray start are tested elsewhere), with `> FILE` written as the shell would; any other line runs
  in bash with this interpreter's folder first on PATH. Python blocks run as a script. Each must exit 0.
- `parse: WHY`: the block needs what this machine lacks (a GPU, a cloud account, a Kubernetes cluster, Docker).
  Its `fluxbatch` lines go through the real argument parser, so a missing argument or a renamed flag fails
  here (Python blocks are compiled), and then the test skips saying WHY.
- `leave out: WHY`: nothing of it can run here (kubectl, helm, make test itself); the test skips saying WHY.
- `job FILE`, `synthesis FILE`, `catalog FILE`, `schedule FILE`: a spec file; written to FILE in the sandbox
  and loaded by its own loader, which must accept it (a later `run` block may use FILE).
- `output`: not a command (what a command prints, a folder layout, a diagram).

An unmarked block fails the test that lists the blocks, so a new block cannot go untried by accident.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_cli import call_cli

pytestmark = pytest.mark.usefixtures("stand_in_renderer")  # the commands as written, not the model

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
KINDS = ("run", "parse", "leave out", "job", "synthesis", "catalog", "schedule", "output")
MARKER = re.compile(rf"<!-- docs-test: (?P<kind>{'|'.join(KINDS)})(?::? (?P<arg>.+?))? -->")


@dataclass(frozen=True)
class Block:
    where: str  # README.md:25
    kind: str
    arg: str
    language: str
    text: str


def blocks_of(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of one document, and a problem line for each block without a valid marker."""
    lines = path.read_text().splitlines()
    found, problems = [], []
    index = 0
    while index < len(lines):
        fence = lines[index]
        if not fence.startswith("```"):
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        where = f"{path.relative_to(ROOT)}:{index + 1}"
        marker = MARKER.fullmatch(lines[index - 1].strip()) if index else None
        if marker is None:
            problems.append(f"{where}: no `<!-- docs-test: KIND -->` line before the block (KIND: {', '.join(KINDS)})")
        else:
            found.append(Block(where, marker["kind"], marker["arg"] or "", fence[3:].strip(),
                               "\n".join(lines[index + 1:end]) + "\n"))
        index = end + 1
    return found, problems


BLOCKS = [block for path in DOCUMENTS for block in blocks_of(path)[0]]
TRIED = [block for block in BLOCKS if block.kind != "output"]


def test_every_block_of_the_readme_and_docs_says_how_it_is_tried():
    problems = [problem for path in DOCUMENTS for problem in blocks_of(path)[1]]
    assert not problems, "\n".join(problems)
    assert sum(block.kind == "run" for block in BLOCKS) >= 4  # the marker regex still finds the runnable ones


def command_lines(text: str) -> list[str]:
    """The block's command lines: `\\`-continued lines joined, blank and comment-only lines left out."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def fluxbatch_argv(line: str) -> tuple[list[str], str | None] | None:
    """`fluxbatch ARGS [> FILE]` as (ARGS, FILE); None for any other line."""
    words = shlex.split(line, comments=True)
    if not words or words[0] != "fluxbatch":
        return None
    if ">" in words:
        at = words.index(">")
        return words[1:at], words[at + 1]
    return words[1:], None


class Sandbox:
    """The folder the blocks run in, and which of the blocks that make things (`run`, specs) have run there: a
    block's test first runs those before it, so any one test runs alone (`-k`, or on another xdist worker)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.done: set[str] = set()

    def up_to(self, block: Block, capsys) -> None:
        for earlier in BLOCKS[:BLOCKS.index(block)]:
            if earlier.where not in self.done and earlier.kind not in ("parse", "leave out", "output"):
                try_block(earlier, self, capsys)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, ray_cluster) -> Sandbox:
    return Sandbox(tmp_path_factory.mktemp("docs-sandbox"))


def run_block(block: Block, sandbox: Path, capsys) -> None:
    if block.language == "python":
        result = subprocess.run([sys.executable, "-c", block.text], cwd=sandbox, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{block.where}: python block exit {result.returncode}\n{result.stderr}"
        return
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for line in command_lines(block.text):
        command = fluxbatch_argv(line)
        if command is None:
            result = subprocess.run(["bash", "-c", line], cwd=sandbox, env=env, capture_output=True, text=True,
                                    timeout=300)
        else:
            argv, into = command
            result = call_cli(capsys, *argv)
            if into is not None:
                (sandbox / into).write_text(result.stdout)
        assert result.returncode == 0, (
            f"{block.where}: `{line}` exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def parse_block(block: Block) -> None:
    from jobs.cli import build_parser
    from jobs.plan_command import plan_parser

    if block.language == "python":
        compile(block.text, block.where, "exec")
        return
    for line in command_lines(block.text):
        command = fluxbatch_argv(line)
        if command is not None:
            argv = command[0]
            try:  # `plan` parses its own flags (jobs/plan_command.py)
                plan_parser().parse_args(argv[1:]) if argv[:1] == ["plan"] else build_parser().parse_args(argv)
            except SystemExit as stop:
                pytest.fail(f"{block.where}: `{line}` is refused by the argument parser (exit {stop.code})")


def load_spec(block: Block, sandbox: Path) -> None:
    from schemas import JobSpec
    from schemas.catalog import CatalogSpec
    from schemas.schedule import ScheduleSpec
    from schemas.synthesis import SynthesisSpec

    loader = {"job": JobSpec, "synthesis": SynthesisSpec, "catalog": CatalogSpec, "schedule": ScheduleSpec}
    path = sandbox / block.arg
    path.write_text(block.text)
    loader[block.kind].from_yaml(path)


def try_block(block: Block, sandbox: Sandbox, capsys) -> None:
    sandbox.done.add(block.where)
    if block.kind == "run":
        run_block(block, sandbox.folder, capsys)
    elif block.kind == "parse":
        parse_block(block)
        pytest.skip(f"left out: {block.arg} (its fluxbatch lines parse)")
    elif block.kind == "leave out":
        pytest.skip(f"left out: {block.arg}")
    else:
        load_spec(block, sandbox.folder)


@pytest.mark.parametrize("block", TRIED, ids=[block.where for block in TRIED])
def test_a_docs_block_runs_as_written(block, sandbox, monkeypatch, capsys):
    monkeypatch.chdir(sandbox.folder)
    sandbox.up_to(block, capsys)
    try_block(block, sandbox, capsys)


def test_the_terminal_screenshot_shows_the_screen_a_terminal_would():
    """docs/screenshots.py rebuilds the last screen of `fluxbatch demo` from what it printed (`make screenshots`)."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from screenshots import screen_lines
    finally:
        sys.path.remove(str(ROOT / "docs"))
    printed = "fluxbatch: rendering\r\n\rrender:   0%|  | 0/2\rrender: 100%|##| 2/2\r\n\x1b[0msummary\r\n\r\n"
    assert screen_lines(printed) == ["fluxbatch: rendering", "render: 100%|##| 2/2", "summary"]
