"""The docs cannot drift: their code runs, their commands parse, their links and references hold.

Conventions (docs/index.md says them to readers):

* A fenced ````python```` block is run.  Each page's blocks run in order in one fresh namespace,
  in an empty working directory, against emulated meters the page starts itself (Tiled
  profiles and ``SMARTMETER_DATA_DIR`` point into that directory).
* A ````text```` block right after a run block is that block's expected standard output,
  compared as doctest does with ``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``: ``...`` stands for
  what differs between runs (ports, uids, times).
* ````python no-run```` blocks (real meters, servers) are compiled, not run.
* Every ``smartmeter …`` and ``smartmeter-emulator …`` command line in a ``bash``/``console``
  block is parsed by the real argument parser.
* Relative links resolve (files and ``#anchors``); docs/reference/api.md lists every public
  name of the packages it documents, and docs/reference/cli.md every command and option.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import doctest
import importlib
import io
import os
import re
import shlex
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from smartmeter_ophyd.cli._common import UsageError
from tests.run_engines import closing_run_engines_in

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+)(?P<info>[^`]*)$")
SHELL_LANGS = {"bash", "sh", "shell", "console"}
OUTPUT_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclass
class Block:
    page: Path
    line: int
    words: tuple[str, ...]
    text: str
    output: Block | None = None

    @property
    def lang(self) -> str:
        return self.words[0] if self.words else ""

    @property
    def runs(self) -> bool:
        return self.lang == "python" and "no-run" not in self.words

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def read_blocks(page: Path) -> list[Block]:
    """Fenced blocks of a page, each run block with its expected output block attached."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    last_end = -2
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(rf"^[ \t]*{fence}\s*$", lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        assert j < len(lines), f"{page.relative_to(ROOT)}:{i + 1}: unclosed code fence"
        block = Block(page, i + 1, tuple(match["info"].split()), "\n".join(body) + "\n")
        between = lines[last_end + 1:i]
        if (block.lang == "text" and blocks and blocks[-1].runs and blocks[-1].output is None
                and all(not s.strip() for s in between)):
            blocks[-1].output = block
        else:
            blocks.append(block)
        last_end = j
        i = j + 1
    return blocks


def runnable_pages() -> list[Path]:
    return [p for p in PAGES if any(b.runs for b in read_blocks(p))]


@contextlib.contextmanager
def isolated(directory: Path) -> Iterator[None]:
    """Working directory, Tiled's user profile directory and SMARTMETER_DATA_DIR in
    ``directory``; restored afterwards."""
    from tiled.profiles import load_profiles, paths

    old_cwd, old_profiles = Path.cwd(), paths[-1]
    old_env = {k: os.environ.get(k) for k in ("SMARTMETER_DATA_DIR", "MPLBACKEND")}
    (directory / "profiles").mkdir()
    paths[-1] = directory / "profiles"
    load_profiles.cache_clear()
    os.environ["SMARTMETER_DATA_DIR"] = str(directory / "smartmeter-data")
    os.environ["MPLBACKEND"] = "Agg"
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        paths[-1] = old_profiles
        load_profiles.cache_clear()
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


OWN_THREADS = ("EmulatorFleet", "emulated meters")
"""Threads a page must stop (fleets it started); libraries' own pools and loops may stay."""


def new_threads(before: set[threading.Thread], wait_s: float = 5.0) -> list[str]:
    """This package's threads started since ``before`` still alive after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = [t for t in threading.enumerate() if t not in before and t.is_alive()
                 and t.name.startswith(OWN_THREADS)]
        if not alive or time.monotonic() > deadline:
            return [t.name for t in alive]
        time.sleep(0.1)


def close_what_a_page_left(namespace: dict[str, object]) -> None:
    """After a page failed half-way: stop its suspenders, meters, fleets and catalogs, so that
    nothing of it acts (or prints) during the next test.  A page that ran to its end closed
    them."""
    from bluesky import RunEngine

    from smartmeter_ophyd.devices import SmartMeter
    from smartmeter_ophyd.emulator import EmulatorFleet
    from smartmeter_ophyd.storage import EmbeddedCatalog

    values = list(namespace.values())
    values += [v for value in values if isinstance(value, list | tuple) for v in value]
    for kind in (RunEngine, SmartMeter, EmulatorFleet, EmbeddedCatalog):
        for value in values:
            if isinstance(value, kind):
                with contextlib.suppress(Exception):
                    if isinstance(value, RunEngine):
                        value.clear_suspenders()
                    elif isinstance(value, SmartMeter):
                        value.destroy()
                    else:
                        value.close()


@pytest.mark.parametrize("page", runnable_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_page_runs(page: Path, tmp_path: Path) -> None:
    """The page's Python blocks run in order and print what the page shows."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    before = set(threading.enumerate())
    with (closing_run_engines_in(namespace), isolated(tmp_path),
          contextlib.ExitStack() as on_failure):
        on_failure.callback(close_what_a_page_left, namespace)
        for block in (b for b in read_blocks(page) if b.runs):
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                try:
                    exec(compile(block.text, block.where, "exec"), namespace)
                except Exception as exc:
                    raise AssertionError(f"{block.where}: the block raised {exc!r}") from exc
            if block.output is not None:
                want, got = block.output.text, stdout.getvalue()
                if not doctest.OutputChecker().check_output(want, got, OUTPUT_FLAGS):
                    pytest.fail(f"{block.where}: output differs from the page's block at "
                                f"line {block.output.line}\n--- page ---\n{want}"
                                f"--- printed ---\n{got}")
        on_failure.pop_all()
    leftover = new_threads(before)
    assert not leftover, f"{page.relative_to(ROOT)} leaves threads running: {leftover}"


def unresolved_names(code: str) -> list[str]:
    """Imports of ``code`` that fail, and ``module.name`` uses of imported modules that name
    nothing: what a block that is compiled but not run can still be checked for."""
    tree = ast.parse(code)
    modules: dict[str, ModuleType] = {}
    problems = []
    for node in ast.walk(tree):
        try:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
                    bound = alias.name if alias.asname else alias.name.split(".")[0]
                    modules[alias.asname or bound] = importlib.import_module(bound)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        importlib.import_module(f"{node.module}.{alias.name}")
                    value = getattr(module, alias.name)
                    if isinstance(value, ModuleType):
                        modules[alias.asname or alias.name] = value
        except (ImportError, AttributeError) as exc:
            problems.append(f"line {node.lineno}: {exc}")

    def resolve(node: ast.expr) -> object | None:
        if isinstance(node, ast.Name):
            return modules.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = resolve(node.value)
            if isinstance(owner, ModuleType):
                if not hasattr(owner, node.attr):
                    problems.append(f"line {node.lineno}: {owner.__name__}.{node.attr} does "
                                    "not exist")
                    return None
                return getattr(owner, node.attr)
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Store):
            resolve(node)
    return sorted(set(problems))


def test_no_run_blocks_compile_and_name_what_exists() -> None:
    wrong = []
    for page in PAGES:
        for block in read_blocks(page):
            if block.lang == "python" and not block.runs:
                compile(block.text, block.where, "exec")
                wrong += [f"{block.where}: {p}" for p in unresolved_names(block.text)]
    assert not wrong, "no-run blocks name what does not exist:\n" + "\n".join(wrong)


def test_output_blocks_follow_run_blocks_only() -> None:
    """A ``text`` block directly after a ``python no-run`` block would look checked but is not."""
    for page in PAGES:
        blocks = read_blocks(page)
        for previous, block in zip(blocks, blocks[1:], strict=False):
            if block.lang == "text" and previous.lang == "python" and not previous.runs:
                assert block.line - previous.line > previous.text.count("\n") + 3, (
                    f"{block.where}: output of a no-run block; say it is illustrative in prose")


# ---------------------------------------------------------------------------- command lines


def command_lines(block: Block) -> Iterator[list[str]]:
    """argv of every simple command in a shell block (prompts, comments, pipes handled)."""
    text = block.text
    if block.lang == "console":  # only prompt lines are commands; the rest is output
        text = "\n".join(line[2:] for line in text.splitlines() if line.startswith("$ "))
    text = text.replace("\\\n", " ")
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token in {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1"}:
                while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                    words.pop(0)  # FOO=bar command ...
                if words:
                    yield words
                words = []
            else:
                words.append(token)


def parser_for(argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]] | None:
    from smartmeter_ophyd.cli.__main__ import build_parser as smartmeter_parser
    from smartmeter_ophyd.emulator.__main__ import build_parser as emulator_parser

    program = Path(argv[0]).name
    if program == "smartmeter":
        return smartmeter_parser(), argv[1:]
    if program == "smartmeter-emulator":
        return emulator_parser(), argv[1:]
    if program.startswith("python") and argv[1:3] == ["-m", "smartmeter_ophyd.emulator"]:
        return emulator_parser(), argv[3:]
    return None


def test_command_lines_parse() -> None:
    checked, wrong = 0, []
    for page in PAGES:
        for block in read_blocks(page):
            if block.lang not in SHELL_LANGS:
                continue
            for argv in command_lines(block):
                found = parser_for(argv)
                if found is None:
                    continue
                parser, args = found
                checked += 1
                stderr = io.StringIO()
                with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                    try:
                        parser.parse_args(args)
                    except SystemExit as exc:  # --help exits 0; argparse's own errors 2
                        if exc.code != 0:
                            wrong.append(f"{block.where}: `{shlex.join(argv)}`: "
                                         f"{stderr.getvalue().strip().splitlines()[-1]}")
                    except UsageError as exc:  # the smartmeter parser's one-line errors
                        wrong.append(f"{block.where}: `{shlex.join(argv)}`: {exc}")
    assert not wrong, "command lines that do not parse:\n" + "\n".join(wrong)
    assert checked >= 10, f"only {checked} command lines found: is the parser check working?"


# ---------------------------------------------------------------------------- links


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    in_code = False
    out = set()
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            out.add(slug(line.lstrip("#")))
    return out


def test_relative_links_resolve() -> None:
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for match in LINK.finditer(text):
            target = match.group(1) or match.group(2)
            if re.match(r"^[a-z]+:", target):
                continue
            path_part, _, fragment = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_page_is_reachable_from_the_index() -> None:
    index = ROOT / "docs" / "index.md"
    seen, todo = {index}, [index]
    while todo:
        page = todo.pop()
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for match in LINK.finditer(text):
            target = (match.group(1) or "").partition("#")[0]
            if target.endswith(".md") and not re.match(r"^[a-z]+:", target):
                dest = (page.parent / target).resolve()
                if dest.exists() and dest not in seen and dest.is_relative_to(ROOT / "docs"):
                    seen.add(dest)
                    todo.append(dest)
    orphans = [str(p.relative_to(ROOT)) for p in PAGES
               if p.is_relative_to(ROOT / "docs") and p.resolve() not in seen]
    assert not orphans, f"pages no link from docs/index.md reaches: {orphans}"


# ---------------------------------------------------------------------------- references


def sections(page: Path, level: str = "## ") -> dict[str, str]:
    """Heading text -> section body, for headings of exactly ``level``."""
    out: dict[str, str] = {}
    current = None
    for line in page.read_text().splitlines():
        if line.startswith(level):
            current = line[len(level):].strip()
            out[current] = ""
        elif current is not None:
            out[current] += line + "\n"
    return out


API_MODULES = (
    "smartmeter_ophyd", "smartmeter_ophyd.devices", "plans", "plans.stubs", "smartmeter_ophyd.timing",
    "smartmeter_ophyd.emulator", "smartmeter_ophyd.client", "smartmeter_ophyd.protocol",
    "smartmeter_ophyd.storage", "smartmeter_ophyd.readback", "smartmeter_ophyd.plotting",
    "smartmeter_ophyd.export",
)


def documented_names(body: str) -> set[str]:
    """Names in the first column of a section's tables (the identifier a cell starts with)."""
    names = set()
    for line in body.splitlines():
        cells = line.split("|")
        if line.startswith("|") and len(cells) > 2:
            names |= set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)", cells[1]))
    return names


def public_names(module_name: str) -> set[str]:
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:  # classes and functions defined in the module
        names = [n for n, v in vars(module).items() if not n.startswith("_")
                 and getattr(v, "__module__", None) == module_name]
    return set(names) - {"__version__"}


@pytest.mark.parametrize("module_name", API_MODULES)
def test_api_reference_lists_every_public_name(module_name: str) -> None:
    body = sections(ROOT / "docs" / "reference" / "api.md").get(f"`{module_name}`")
    assert body is not None, f"docs/reference/api.md has no section ## `{module_name}`"
    documented = documented_names(body)
    missing = public_names(module_name) - documented
    assert not missing, f"`{module_name}` names missing from docs/reference/api.md: {sorted(missing)}"
    module = importlib.import_module(module_name)
    stale = [n for n in documented if not hasattr(module, n)]
    assert not stale, f"docs/reference/api.md lists names `{module_name}` lacks: {sorted(stale)}"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings
            if s.startswith("--") and s != "--help"}


def test_cli_reference_lists_every_command_and_option() -> None:
    from smartmeter_ophyd.cli.__main__ import build_parser as smartmeter_parser
    from smartmeter_ophyd.emulator.__main__ import build_parser as emulator_parser

    reference = sections(ROOT / "docs" / "reference" / "cli.md", "### ")
    missing = []
    for name, sub in subcommands(smartmeter_parser()).items():
        body = reference.get(f"smartmeter {name}")
        if body is None:
            missing.append(f"### smartmeter {name}")
            continue
        missing += [f"smartmeter {name} {o}" for o in sorted(long_options(sub))
                    if f"`{o}" not in body]
    body = reference.get("smartmeter-emulator")
    if body is None:
        missing.append("### smartmeter-emulator")
    else:
        missing += [f"smartmeter-emulator {o}" for o in sorted(long_options(emulator_parser()))
                    if f"`{o}" not in body]
    assert not missing, "docs/reference/cli.md lacks:\n" + "\n".join(missing)

