"""
The machinery of `tests/test_docs.py`: find the code blocks of the Markdown documentation, read their `doc-test`
markers, prepare a working directory with fixtures, and run Python blocks in one interpreter session per file and
shell blocks command by command. The rules themselves are described in `test_docs.py`'s docstring.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

PYTHON_LANGUAGES = {"python", "py", "python3"}
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "shell-session"}
# Blocks in these languages (and fenced blocks without a language) are diagrams, data, output or citations: not run.
TEXT_LANGUAGES = {
    "", "text", "txt", "plain", "plaintext", "output", "json", "jsonl", "yaml", "yml", "toml", "ini", "csv",
    "bibtex", "bib", "diff", "markdown", "md",
}  # fmt: skip

# ----------------------------------------------------------------------------------------------------------------------
# Markers: `<!-- doc-test: DIRECTIVE; DIRECTIVE ... -->` on the line(s) right above a block
# ----------------------------------------------------------------------------------------------------------------------

MARKER = re.compile(r"^\s*<!--\s*doc-test:(?P<body>.*?)-->\s*$")
DIRECTIVE_NAMES = ("skip", "slow-full", "slow", "reduced", "isolated", "env", "timeout")


class MarkerError(ValueError):
    """A `doc-test` marker that does not parse; the test of its block fails with this message."""


@dataclasses.dataclass
class Directives:
    skip: str | None = None  # the reason
    slow: str | None = None  # the reason ("" when none was given)
    reduced: bool = False
    slow_full: bool = False
    isolated: bool = False
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    timeout: float | None = None
    error: str | None = None  # a marker that did not parse


def _parenthesised(text: str, start: int) -> tuple[str, int]:
    """The text inside the balanced parentheses opening at `text[start]`, and the index after them."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "(":
            depth += 1
        elif text[index] == ")":
            depth -= 1
            if depth == 0:
                return text[start + 1 : index].strip(), index + 1
    raise MarkerError(f"unbalanced parentheses in {text!r}")


def parse_directives(body: str, directives: Directives | None = None) -> Directives:
    """Parse the inside of one marker comment (after `doc-test:`), adding to `directives`."""
    directives = directives or Directives()
    position, body = 0, body.strip()
    while position < len(body):
        match = re.compile(r"\s*([a-z-]+)").match(body, position)
        if not match or match.group(1) not in DIRECTIVE_NAMES:
            raise MarkerError(f"unknown doc-test directive at {body[position:]!r}; known: {', '.join(DIRECTIVE_NAMES)}")
        name, position = match.group(1), match.end()
        rest = body[position:]
        stripped = rest.lstrip()
        argument = None
        if stripped.startswith("("):
            argument, end = _parenthesised(body, position + len(rest) - len(stripped))
            position = end
        elif name in ("env", "timeout"):
            end = body.find(";", position)
            end = len(body) if end < 0 else end
            argument, position = body[position:end].strip(), end
        if name == "skip":
            if not argument:
                raise MarkerError("`skip` needs a reason in parentheses: <!-- doc-test: skip (needs a GPU) -->")
            directives.skip = argument
        elif name == "slow":
            directives.slow = argument or ""
        elif name == "reduced":
            directives.reduced = True
        elif name == "slow-full":
            directives.slow_full = True
        elif name == "isolated":
            directives.isolated = True
        elif name == "timeout":
            try:
                directives.timeout = float(argument)
            except (TypeError, ValueError):
                raise MarkerError(f"`timeout` needs seconds, e.g. `timeout 300`, got {argument!r}") from None
        elif name == "env":
            for item in shlex.split(argument or ""):
                key, equals, value = item.partition("=")
                if not equals or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                    raise MarkerError(f"`env` takes NAME=VALUE pairs, got {item!r}")
                directives.env[key] = value
            if not directives.env:
                raise MarkerError("`env` needs at least one NAME=VALUE")
        rest = body[position:].lstrip()
        if rest.startswith(";"):
            position = len(body) - len(rest) + 1
        elif rest:
            raise MarkerError(f"expected `;` between doc-test directives, at {rest!r}")
        else:
            break
    if directives.slow_full and not directives.reduced:
        raise MarkerError("`slow-full` only goes with `reduced` (it adds the unreduced run as a slow case)")
    return directives


# ----------------------------------------------------------------------------------------------------------------------
# Markdown: fenced blocks, indented blocks, and the markers above them
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Block:
    path: Path  # the Markdown file
    name: str  # its path relative to the repository, e.g. "docs/usage.md"
    line: int  # 1-based line of the opening fence (indented block: of its first line)
    language: str  # the info string's first word, lower case ("" when none)
    code: str  # the content, with the fence's indentation removed
    code_line: int  # 1-based line of the first content line
    fenced: bool
    directives: Directives

    @property
    def id(self) -> str:
        return f"{self.name}:{self.line}"

    @property
    def kind(self) -> str:
        """python, shell, text (not run), indented (an indented code block: refused), or unknown (a language the
        harness cannot run: refused)."""
        if not self.fenced:
            return "indented"
        if self.language in PYTHON_LANGUAGES:
            return "python"
        if self.language in SHELL_LANGUAGES:
            return "shell"
        if self.language in TEXT_LANGUAGES:
            return "text"
        return "unknown"


_FENCE = re.compile(r"^(?P<indent>[ ]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_LIST_ITEM = re.compile(r"^(?P<indent>[ ]*)(?:[-*+]|\d{1,9}[.)])(?P<space>[ ]+)\S")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _markers_above(lines: list[str], index: int) -> Directives:
    """The directives of the marker lines right above `lines[index]` (blank lines between are allowed)."""
    directives = Directives()
    cursor = index - 1
    while cursor >= 0 and not lines[cursor].strip():
        cursor -= 1
    found = []
    while cursor >= 0 and MARKER.match(lines[cursor]):
        found.append(cursor)
        cursor -= 1
    for marker_index in reversed(found):
        try:
            parse_directives(MARKER.match(lines[marker_index]).group("body"), directives)
        except MarkerError as error:
            directives.error = f"line {marker_index + 1}: {error}"
    return directives


def parse_markdown(path: Path, root: Path = REPO_ROOT) -> list[Block]:
    """Every code block of a Markdown file, fenced (``` or ~~~) or indented (4 spaces after a blank line)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
    blocks: list[Block] = []
    index = 0
    list_content_indent = None  # content column of the list item we are in, if any
    previous_blank = True
    while index < len(lines):
        line = lines[index]
        fence = _FENCE.match(line)
        if fence and not (fence.group("fence")[0] == "`" and "`" in fence.group("info")):
            indent, marker = len(fence.group("indent")), fence.group("fence")
            closing = re.compile(rf"^[ ]*{re.escape(marker[0])}{{{len(marker)},}}[ \t]*$")
            end = index + 1
            while end < len(lines) and not closing.match(lines[end]):
                end += 1
            body = [
                content[min(indent, _indent(content)) :] for content in lines[index + 1 : end]
            ]  # CommonMark: remove up to the fence's indentation
            info = fence.group("info").strip()
            directives = _markers_above(lines, index)
            blocks.append(
                Block(path, name, index + 1, (info.split() or [""])[0].lower(), "\n".join(body) + "\n", index + 2,
                      True, directives)
            )  # fmt: skip
            index, previous_blank = end + 1, False
            continue
        if not line.strip():
            previous_blank, index = True, index + 1
            continue
        item = _LIST_ITEM.match(line)
        if item:
            list_content_indent = item.end() - 1  # the column where the item's text starts
        elif list_content_indent is not None and _indent(line) < list_content_indent and previous_blank:
            list_content_indent = None
        code_indent = 4 + (list_content_indent or 0)
        if previous_blank and _indent(line) >= code_indent and not item:
            end = index
            while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) >= code_indent):
                end += 1
            while end > index and not lines[end - 1].strip():
                end -= 1
            body = textwrap.dedent("\n".join(lines[index:end]))
            directives = _markers_above(lines, index)
            blocks.append(Block(path, name, index + 1, "", body + "\n", index + 1, False, directives))
            index, previous_blank = end, False
            continue
        previous_blank, index = False, index + 1
    return blocks


# ----------------------------------------------------------------------------------------------------------------------
# Shell blocks: commands, `pip install`, reduced runs
# ----------------------------------------------------------------------------------------------------------------------

_PIP_INSTALL = re.compile(r"^\s*(?:python3?\s+-m\s+)?pip3?\s+install\b")


def _scan(command: str):
    """Yield (index, char, quoted) for each character of a shell command, tracking quotes and backslashes."""
    quote, escaped = None, False
    for index, char in enumerate(command):
        if escaped:
            escaped = False
            yield index, char, True
            continue
        if char == "\\" and quote != "'":
            escaped = True
            yield index, char, True
            continue
        if quote:
            if char == quote:
                quote = None
            yield index, char, True
            continue
        if char in "'\"":
            quote = char
            yield index, char, True
            continue
        yield index, char, False


def strip_comment(command: str) -> str:
    """`command` without a trailing `# comment` (a `#` outside quotes, at the start or after whitespace)."""
    for index, char, quoted in _scan(command):
        if char == "#" and not quoted and (index == 0 or command[index - 1] in " \t"):
            return command[:index].rstrip()
    return command.rstrip()


def split_and(command: str) -> list[str]:
    """Split a command at `&&` outside quotes."""
    parts, start, skip_next = [], 0, False
    for index, char, quoted in _scan(command):
        if skip_next:
            skip_next = False
            continue
        if not quoted and char == "&" and command[index + 1 : index + 2] == "&":
            parts.append(command[start:index].strip())
            start, skip_next = index + 2, True
    parts.append(command[start:].strip())
    return parts


def shell_commands(code: str, language: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comment-only and blank lines dropped. In a
    `console` block (or any block with `$ ` prompts) only the prompted lines are commands; the rest is output."""
    lines = code.splitlines()
    prompted = language in ("console", "shell-session") or any(line.lstrip().startswith("$ ") for line in lines)
    commands, current, continuing = [], "", False
    for line in lines:
        if not continuing:
            stripped = line.strip()
            if prompted:
                if not stripped.startswith("$ "):
                    continue
                stripped = stripped[2:].strip()
            if not stripped or stripped.startswith("#"):
                continue
            current = stripped
        else:
            current += " " + line.strip()
        continuing = current.endswith("\\")
        if continuing:
            current = current[:-1].rstrip()
        else:
            commands.append(current)
    if continuing and current:
        commands.append(current)
    return commands


@dataclasses.dataclass
class PlannedCommand:
    shown: str  # as written in the document
    run: str | None  # what the harness runs (None: not run)
    note: str = ""  # why it differs


def plan_shell_block(code: str, language: str, reduced_args: dict[str, list[str]] | None) -> list[PlannedCommand]:
    """
    What to run for each command of a shell block: `pip install ...` is not run (the test environment is already
    installed; a command `pip install ... && rest` runs `rest`), and with `reduced_args` every command that runs one
    of its scripts gets that script's flags appended (argparse: a later flag wins over an earlier one).
    """
    planned = []
    for command in shell_commands(code, language):
        parts = split_and(strip_comment(command))
        kept = [part for part in parts if not _PIP_INSTALL.match(part)]
        note = "installs packages: not run" if len(kept) < len(parts) else ""
        if not kept:
            planned.append(PlannedCommand(command, None, note))
            continue
        run = " && ".join(kept) if note else command
        if reduced_args is not None:
            words = shlex.split(strip_comment(kept[-1]), comments=False)
            scripts = [script for script in reduced_args if script in words]
            if scripts:
                run = strip_comment(" && ".join(kept)) + " " + shlex.join(reduced_args[scripts[0]])
                note = "; ".join(filter(None, [note, f"reduced: {shlex.join(reduced_args[scripts[0]])}"]))
            elif any(script in strip_comment(part) for part in kept for script in reduced_args):
                raise MarkerError(f"reduced: the script must be in the last part of {command!r}")
        planned.append(PlannedCommand(command, run, note))
    if reduced_args is not None and not any("reduced:" in command.note for command in planned):
        raise MarkerError(
            f"`reduced`, but no command of the block runs a script of REDUCED_ARGS ({', '.join(reduced_args)})"
        )
    return planned


# ----------------------------------------------------------------------------------------------------------------------
# Running: one Python interpreter per file, shell commands in the same working directory
# ----------------------------------------------------------------------------------------------------------------------

# Warnings that fail a Python block: documented code must not call anything deprecated.
FAILING_WARNINGS = ("FutureWarning", "DeprecationWarning", "PendingDeprecationWarning")

WORKER = r"""
import json, linecache, os, sys, traceback, warnings
requests, results = os.fdopen(int(sys.argv[1])), os.fdopen(int(sys.argv[2]), "w")
failing = tuple(getattr(__builtins__, name) for name in sys.argv[3].split(","))
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
for request in requests:
    request = json.loads(request)
    name, source = request["name"], request["source"]
    text = open(request["path"], encoding="utf-8").read()
    linecache.cache[name] = (len(text), None, text.splitlines(True), name)
    print(f"\n===== {name}:{request['line']} =====", flush=True)
    error, bad = None, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            exec(compile("\n" * (request["code_line"] - 1) + source, name, "exec"), namespace)
        except BaseException as exception:
            tb = exception.__traceback__.tb_next if exception.__traceback__ is not None else None
            error = "".join(traceback.format_exception(type(exception), exception, tb))
    for warning in caught:
        text = warnings.formatwarning(warning.message, warning.category, warning.filename, warning.lineno)
        sys.stderr.write(text)
        # torch's own DeprecationWarnings are ignored, as in pytest.ini
        if issubclass(warning.category, failing) and not (
            warning.category is DeprecationWarning and "/torch/" in warning.filename
        ):
            bad.append(text.strip())
    sys.stdout.flush()
    sys.stderr.flush()
    results.write(json.dumps({"error": error, "warnings": bad}) + "\n")
    results.flush()
requests.close()
results.close()
"""

# Variables that tell a process it was started by a launcher; a doc command must start from a clean slate.
_LAUNCHER_VARIABLES = (
    "LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MPI_LOCALNRANKS",
    "OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE", "PMI_SIZE",
)  # fmt: skip


def session_environment(workdir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every documented command: offline, one thread, HOME in the working directory."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _LAUNCHER_VARIABLES and not key.startswith(("ACCELERATE_", "HF_", "TRANSFORMERS_", "PYTEST_"))
    }
    env.update(
        HOME=str(workdir),  # `~/images` is the fixture folder; caches and `accelerate config` files stay here
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        HF_HUB_OFFLINE="1",  # nothing may download: a Hub id without a local folder fails at once
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        OMP_NUM_THREADS="1",  # 2 shared cores: one thread per process, as the rest of the suite
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        MPLBACKEND="Agg",
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.update(extra or {})
    return env


@dataclasses.dataclass
class Outcome:
    ok: bool
    message: str = ""  # the error, with the output's tail
    seconds: float = 0.0


def _tail(text: str, limit: int = 6000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


_CHILDREN: set[subprocess.Popen] = set()  # running processes of the documented blocks, killed when the session ends


def _start(command: list[str], **kwargs) -> subprocess.Popen:
    process = subprocess.Popen(command, start_new_session=True, **kwargs)
    _CHILDREN.add(process)
    return process


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    _CHILDREN.discard(process)


def kill_children() -> None:
    """Kill every process (and its process group) a block started that is still running."""
    for process in list(_CHILDREN):
        if process.poll() is None:
            _kill(process)
        _CHILDREN.discard(process)


class PythonSession:
    """One interpreter that runs the Python blocks of a file in order, in one namespace, in `workdir`."""

    def __init__(self, workdir: Path, env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 - the interpreter writes to it until close()
        # Requests and results travel through pipes of their own: the blocks' stdin is /dev/null (a prompt such as
        # transformers' "Do you wish to run the custom code?" then fails at once, as in CI).
        request_read, request_write = os.pipe()
        result_read, result_write = os.pipe()
        self.process = _start(
            [sys.executable, "-u", "-c", WORKER, str(request_read), str(result_write), ",".join(FAILING_WARNINGS)],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            pass_fds=(request_read, result_write),
        )  # fmt: skip
        os.close(request_read)
        os.close(result_write)
        self.requests = os.fdopen(request_write, "w")
        self.results = os.fdopen(result_read)
        self.dead = False

    def run(self, block: Block, timeout: float) -> Outcome:
        start = time.monotonic()
        if self.dead:
            return Outcome(False, "the session of this file was killed by an earlier block's timeout")
        offset = self.log_path.stat().st_size
        request = {"path": str(block.path), "name": block.name, "line": block.line, "code_line": block.code_line,
                   "source": block.code}  # fmt: skip
        try:
            self.requests.write(json.dumps(request) + "\n")
            self.requests.flush()
        except BrokenPipeError:
            self.dead = True
        ready, _, _ = select.select([self.results], [], [], timeout) if not self.dead else ([], [], [])
        reply = self.results.readline() if ready else ""
        self.log.flush()
        output = self.log_path.read_bytes()[offset:].decode("utf-8", "replace")
        seconds = time.monotonic() - start
        if not reply:
            self.dead = True
            _kill(self.process)
            why = f"timed out after {timeout:.0f} s" if not ready else f"the interpreter exited ({self.process.poll()})"
            return Outcome(False, f"{why}\n--- output ---\n{_tail(output)}", seconds)
        reply = json.loads(reply)
        if reply["error"]:
            return Outcome(False, f"{reply['error']}\n--- output ---\n{_tail(output)}", seconds)
        if reply["warnings"]:
            return Outcome(False, "the block emits deprecation warnings:\n" + "\n".join(reply["warnings"]), seconds)
        return Outcome(True, output, seconds)

    def close(self) -> None:
        try:
            self.requests.close()
        except OSError:
            pass
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _kill(self.process)
        _CHILDREN.discard(self.process)
        self.results.close()
        self.log.close()


def shell_script(planned: list[PlannedCommand]) -> str:
    """
    One bash script for a block, as a reader pasting it into a terminal runs it (`cd` and `export` carry over), that
    stops at the first command that fails: each command is echoed as `$ command`, then run inside `{ ...; } || exit`,
    which also catches a failure on the left of `&&` (which `set -e` would not).
    """
    lines = ["set -o pipefail"]
    for command in planned:
        shown = f"$ {command.run or command.shown}" + (f"\n[{command.note}]" if command.note else "")
        lines.append(f"printf '%s\\n' {shlex.quote(shown)}")
        if command.run is not None:
            lines += ["{", command.run, "} || exit $?"]
    return "\n".join(lines) + "\n"


def run_shell_block(
    block: Block,
    workdir: Path,
    env: dict[str, str],
    reduced_args: dict[str, list[str]] | None,
    timeout: float,
    full: bool = False,
) -> Outcome:
    """Run a shell block with bash in `workdir` (`shell_script`): `ok` when every command succeeds."""
    start = time.monotonic()
    planned = plan_shell_block(block.code, block.language, None if full else reduced_args)
    if not any(command.run for command in planned):
        return Outcome(True, "nothing to run")
    process = _start(
        ["bash", "-c", shell_script(planned)], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(process)
        output = process.communicate()[0] or ""
        return Outcome(False, f"timed out after {timeout:.0f} s:\n{_tail(output)}", time.monotonic() - start)
    _CHILDREN.discard(process)
    if process.returncode != 0:
        failed = [line for line in output.splitlines() if line.startswith("$ ")][-1:]
        return Outcome(
            False,
            f"exit code {process.returncode} of:\n{failed[0][2:] if failed else '?'}\n--- transcript ---\n{_tail(output)}",
            time.monotonic() - start,
        )
    return Outcome(True, output, time.monotonic() - start)


# ----------------------------------------------------------------------------------------------------------------------
# The working directory: the checkout (symlinked) plus fixtures at the paths the documents name
# ----------------------------------------------------------------------------------------------------------------------

# Top-level entries of the checkout that a documented command must not see: outputs of real runs would stand in for
# the fixtures, and the rest is tooling.
_NOT_LINKED = {".git", "outputs", "runs", ".pytest_cache", ".ruff_cache", ".benchmarks", "build", "dist", ".bench"}


def prepare_workdir(workdir: Path, fixtures: Path, fixture_paths: dict[str, str], text: str) -> None:
    """
    `workdir` becomes a stand-in for a clone of the repository: a symlink to each top-level entry of the checkout
    (`examples/`, `benchmarks/`, `stellar_hf/`, ...) and, at each documented path of `fixture_paths` that `text`
    mentions, a copy of the fixture it names.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    for entry in REPO_ROOT.iterdir():
        if entry.name not in _NOT_LINKED and not entry.name.endswith(".egg-info"):
            (workdir / entry.name).symlink_to(entry)
    for documented, fixture in fixture_paths.items():
        if documented not in text:
            continue
        source, target = fixtures / fixture, workdir / documented
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------------

# The documents' model: the suite's tiny config with 16-px patches (so that a 224 x 320 image is a 14 x 20 grid, as the
# docs say of the released models) at 64 px, and 16 sparse tokens like the released models (the editing snippets move
# token 3's area to token 5).
DOC_MODEL_OVERRIDES = {"image_size": 64, "patch_size": 16, "num_sparse_tokens": 16}
# An original-format checkpoint the converter reads without flags: a standard ViT-S width (384, 6 heads; 12 heads of 32
# fit too) and the original's 512-wide decoder, one layer each, a VQ head over the tiny tokenizer's 16 codes.
ORIGINAL_CHECKPOINT_CONFIG = {
    "hidden_size": 384, "num_hidden_layers": 1, "num_attention_heads": 6, "intermediate_size": 64,
    "image_size": 64, "patch_size": 16, "num_sparse_tokens": 16,
    "decoder_hidden_size": 512, "decoder_num_hidden_layers": 1, "decoder_num_attention_heads": 8,
    "decoder_intermediate_size": 64, "reconstruction_target": "vq", "vq_codebook_size": 16,
    "num_prototypes": 32, "prototype_dim": 16, "predictor_hidden_size": 64,
}  # fmt: skip
# A MaskGIT VQGAN with the released downsampling (f = 16: five levels) and 16 codes, small enough to build in a blink.
TINY_VQGAN_CONFIG = {
    "hidden_channels": 32, "channel_mult": [1, 1, 1, 1, 1], "num_res_blocks": 1, "z_channels": 32,
    "codebook_size": 16, "codebook_dim": 32, "image_size": 64,
}  # fmt: skip


def _photos():
    import skimage.data

    return {
        "astronaut": skimage.data.astronaut(),
        "cat": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "rocket": skimage.data.rocket(),
    }


def _crops(image, count: int, seed: int, size: int = 96):
    """`count` random square crops of a photograph (numpy HxWx3), flipped at random, resized to `size` px."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(seed)
    height, width = image.shape[:2]
    for _ in range(count):
        side = int(generator.integers(min(height, width) // 2, min(height, width) + 1))
        top, left = int(generator.integers(0, height - side + 1)), int(generator.integers(0, width - side + 1))
        crop = Image.fromarray(image[top : top + side, left : left + side]).resize((size, size), Image.BICUBIC)
        yield crop.transpose(Image.FLIP_LEFT_RIGHT) if generator.random() < 0.5 else crop


def build_fixtures(dest: Path) -> Path:
    """
    Every fixture, once per test session, under `dest` (names are the fixtures', not the documents'; the mapping from
    documented paths is `FIXTURE_PATHS` in test_docs.py):

    - `photo.jpg`, `cat.jpg`, `a.jpg`, `b.jpg`: photographs shipped with scikit-image;
    - `images/`: 8 crops of them (an unlabelled image folder); `labelled/train/<class>/`, `labelled/val/<class>/`:
      3 classes of crops (an image folder with one subfolder per class);
    - `stellar-pretrain/`: a tiny `StellarForPreTraining` (pixel target) with its image processor, as
      `examples/pretrain.py` writes it;
    - `maskgit-vqgan/`: a tiny MaskGIT VQGAN folder, as `python -m stellar_hf.convert_vqgan` writes it;
    - `vit-mae/`: a tiny transformers `ViTMAEModel` folder with the STELLAR model's encoder sizes;
    - `original.safetensors`, `original.ckpt`: a VQ-target `StellarForPreTraining` in the original code's layout,
      as a released file and as a Lightning checkpoint.
    """
    import torch
    from stellar_tester import tiny_config
    from test_convert import original_state_dict, write_checkpoint  # the suite's writer of the original layout
    from transformers import ViTMAEConfig, ViTMAEModel

    from stellar_hf import MaskGitVQGANConfig, MaskGitVQGANModel, StellarConfig, StellarImageProcessor
    from stellar_hf.modeling_stellar import StellarForPreTraining

    dest.mkdir(parents=True, exist_ok=True)
    photos = _photos()
    for name, photo in (("photo.jpg", "astronaut"), ("cat.jpg", "cat"), ("a.jpg", "coffee"), ("b.jpg", "rocket")):
        from PIL import Image

        Image.fromarray(photos[photo]).save(dest / name, quality=90)
    (dest / "images").mkdir()
    for index, crop in enumerate(_crops(photos["astronaut"], 4, 0)):
        crop.save(dest / "images" / f"astronaut_{index}.jpg")
    for index, crop in enumerate(_crops(photos["coffee"], 4, 1)):
        crop.save(dest / "images" / f"coffee_{index}.png")
    for split, count in (("train", 6), ("val", 3)):
        for seed, label in enumerate(("cat", "coffee", "rocket")):
            folder = dest / "labelled" / split / label
            folder.mkdir(parents=True)
            for index, crop in enumerate(_crops(photos[label], count, seed + (10 if split == "val" else 0))):
                crop.save(folder / f"{index}.png")

    torch.manual_seed(0)
    config = tiny_config(**DOC_MODEL_OVERRIDES)
    StellarForPreTraining(config).save_pretrained(dest / "stellar-pretrain")
    StellarImageProcessor.from_model_config(config).save_pretrained(dest / "stellar-pretrain")

    MaskGitVQGANModel(MaskGitVQGANConfig(**TINY_VQGAN_CONFIG)).save_pretrained(dest / "maskgit-vqgan")

    ViTMAEModel(
        ViTMAEConfig(
            hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
            image_size=config.image_size, patch_size=config.patch_size,
        )
    ).save_pretrained(dest / "vit-mae")  # fmt: skip

    original = original_state_dict(StellarForPreTraining(StellarConfig(**ORIGINAL_CHECKPOINT_CONFIG)).eval())
    write_checkpoint(original, dest / "original.safetensors")
    write_checkpoint(original, dest / "original.ckpt")
    return dest
