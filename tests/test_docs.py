"""
Every code block of the documentation runs, so that a snippet that drifts from the code fails here.

Files: `README.md`, `MODEL_CARD.md` and `docs/*.md` (`stellar_hf/MODEL_CARD.md` is a symlink to `MODEL_CARD.md`).
One test case per code block, named `FILE:LINE` (the line of the opening fence), e.g. `docs/usage.md:150`.

What counts as code:

- fenced ```` ```python ```` (also `py`) blocks: Python;
- fenced ```` ```bash ````, `sh`, `shell` and `console` blocks: shell commands (in `console` blocks, or any block with
  `$ ` prompts, only the prompted lines; the rest is output);
- fenced blocks without a language and ```` ```text ````, `json`, `yaml`, `bibtex`, ... are diagrams, data, output or
  citations: not code, no test case;
- any other language, and indented (4-space) code blocks, get a case that fails and says how to fence them: an
  indented block has no language, so the harness cannot tell a command from a diagram.

How blocks run:

- Python blocks of one file run in order in one fresh interpreter (a later block may use an earlier block's names),
  started in a temporary working directory prepared for that file (below). A block fails on an exception or on a
  `FutureWarning` / `DeprecationWarning` it causes (torch's own `DeprecationWarning`s excepted, as in pytest.ini):
  documented code must not call anything deprecated. Tracebacks point at the Markdown file's lines.
- Shell blocks run as one bash script in the same working directory, in document order with the Python blocks, as a
  reader pasting the block into a terminal would (`cd` and `export` carry over to the block's next commands, not to
  later blocks); each command is echoed, and the first one that fails (`false && x` included) fails the case.
  `python`, `accelerate`, `hf` and `torchrun` are those of this interpreter; stdin is empty, so a command that asks
  a question fails. A command `pip install ...` is not run (the test environment is the one `pip install -e ".[dev]"`
  made); in `pip install ... && rest`, `rest` runs.
- Different files run in parallel (two at a time), each file in order, starting when the session starts; the cases
  report their block's outcome. The first failure of a file does not stop its later blocks, but their failures name
  it.
- Running one case alone (`pytest tests/test_docs.py -k usage.md:198`) first runs the earlier blocks of its file that
  are neither skipped nor slow, since it may need their names or files.

The working directory stands in for a clone of the repository: it links every top-level entry of the checkout
(`examples/`, `benchmarks/`, `stellar_hf/`, ..., but not `outputs/`) and holds fixtures at the paths the documents
name, per `FIXTURE_PATHS` below (a fixture is copied when its documented path occurs in the file). Models are tiny
(`tests/stellar_tester.py::tiny_config` with `doc_blocks.DOC_MODEL_OVERRIDES`); photographs come from scikit-image.
Hub ids that the documents use are mapped the same way: a folder at the relative path `facebook/vit-mae-base` is what
`from_pretrained("facebook/vit-mae-base")` and friends load first. Nothing downloads: `HF_HUB_OFFLINE=1` (and the
datasets / transformers / evaluate equivalents) is set, so a Hub id without a local folder fails at once. `HOME` is the
working directory (`~/images` is a fixture; `accelerate config` files stay there), and every process runs on one
thread.

Markers: an HTML comment on the line right above a block (blank lines between are allowed; several marker lines add
up), invisible in rendered Markdown:

    <!-- doc-test: skip (needs the Hub: downloads facebook/vit-mae-base) -->
    <!-- doc-test: slow (trains for 5 minutes) -->
    <!-- doc-test: reduced -->
    <!-- doc-test: reduced; slow-full -->
    <!-- doc-test: isolated -->
    <!-- doc-test: env STELLAR_TEST_DEVICE=cpu; timeout 600 -->

- `skip (REASON)`: the case is skipped with REASON, which is required. Use it for blocks that need the network, a GPU,
  files that cannot be made here, or an interactive prompt; the reason says which.
- `slow (REASON)`: the case is marked `slow` (CI skips it; see conftest.py).
- `reduced` (shell blocks): each command that runs a script of `REDUCED_ARGS` gets that script's flags appended
  (argparse keeps the last value of a flag): the real command line, on a tiny model and a few steps.
  `reduced; slow-full` adds a second case, `FILE:LINE:full`, marked slow, that runs the block as written, in a
  working directory of its own.
- `isolated` (Python blocks): the block runs in a fresh interpreter of its own, e.g. to show what happens in a process
  that never imported `stellar_hf`. Later blocks do not see its names.
- `env NAME=VALUE ...`: extra environment variables for a shell block's commands, or for an `isolated` Python
  block's interpreter (a Python block that shares the file's interpreter cannot have its own environment).
- `timeout SECONDS`: the block's time limit (default: 120 s for a Python block, 300 s for a shell block, 3600 s for a
  `:full` case).

MODEL_CARD.md is a template: a fenced block holding `{{placeholders}}` is skipped here; its snippets are filled in by
`stellar_hf.model_card` and run on the rendered card by tests/test_model_card.py.
"""

from __future__ import annotations

import os
import re
import shlex
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from doc_blocks import (
    DOC_MODEL_OVERRIDES,
    REPO_ROOT,
    Block,
    MarkerError,
    Outcome,
    PythonSession,
    build_fixtures,
    kill_children,
    parse_directives,
    parse_markdown,
    plan_shell_block,
    prepare_workdir,
    run_shell_block,
    session_environment,
)
from stellar_tester import TINY_CONFIG

# Documented path -> fixture built by `doc_blocks.build_fixtures`. Hub ids and the documents' placeholders are local
# folders of the same name in the working directory.
FIXTURE_PATHS = {
    "photo.jpg": "photo.jpg",
    "cat.jpg": "cat.jpg",
    "a.jpg": "a.jpg",
    "b.jpg": "b.jpg",
    "images": "images",  # ~/images
    "my_images": "images",  # ~/my_images
    "data/train": "labelled/train",
    "data/val": "labelled/val",
    "outputs/stellar-pretrain": "stellar-pretrain",  # what the Quick start writes
    "path/or/hub-id": "stellar-pretrain",  # docs/usage.md's placeholder
    "path/to/stellar": "stellar-pretrain",  # docs/evaluation.md's placeholder
    "maskgit-vqgan": "maskgit-vqgan",  # what `python -m stellar_hf.convert_vqgan` writes
    "facebook/vit-mae-base": "vit-mae",  # Hub id
    "original/stellar-b16.safetensors": "original.safetensors",  # what `hf download microsoft/STELLAR ...` gives
    "stellar-b16.safetensors": "original.safetensors",
    "run.ckpt": "original.ckpt",  # a Lightning checkpoint of the original code
}

_TINY_OVERRIDES = ",".join(
    f"{key}={value}" for key, value in {**TINY_CONFIG, **DOC_MODEL_OVERRIDES}.items() if key != "num_labels"
)
# Flags appended to a documented command in a `reduced` block, per script it runs.
REDUCED_ARGS = {
    "examples/pretrain.py": [
        "--config_overrides", _TINY_OVERRIDES, "--max_train_steps", "2", "--per_device_train_batch_size", "4",
        "--num_synthetic_images", "16", "--num_synthetic_eval_images", "16", "--report_to", "none",
        "--overwrite_output_dir", "--cpu_threads", "1",
    ],
    "examples/run_evaluation.py": ["--num_images", "12", "--batch_size", "8", "--no_progress"],
    "benchmarks/inference.py": [
        "--models", "s16", "--batch_size", "1", "--image_size", "32", "--repeats", "1", "--warmup", "0",
        "--threads", "1", "--scaling_tokens", "1,4", "--scaling_resolutions", "32,48", "--scaling_batches", "1,2",
    ],
    "benchmarks/compare_mae.py": [
        "--image_size", "16", "--config_overrides", _TINY_OVERRIDES.replace("image_size=64", "image_size=16")
        .replace("patch_size=16", "patch_size=8"), "--steps", "2", "--batch_size", "8", "--num_synthetic_images",
        "32", "--num_synthetic_eval_images", "16", "--num_digits_images", "60", "--no_progress",
    ],
    "benchmarks/data_pipeline.py": ["--rounds", "1", "--images", "1", "--batch_size", "2", "--skip_training_step"],
    "benchmarks/explorer_latency.py": ["--models", "quick-start", "--repeats", "1", "--warmup", "0"],
    "benchmarks/pretrain_step.py": [
        "--image_size", "32", "--local_image_size", "16", "--batch_size", "1", "--num_masked_views", "1",
        "--num_local_views", "1", "--num_prototypes", "64", "--repeats", "1", "--warmup", "1", "--threads", "1",
    ],
}  # fmt: skip

DOC_FILES = [REPO_ROOT / "README.md", REPO_ROOT / "MODEL_CARD.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
PYTHON_TIMEOUT, SHELL_TIMEOUT = 120.0, 300.0
# Files run in parallel, each in order: two at a time suits the 2-core CI machine (every process runs one thread).
WORKERS = max(1, min(2, os.cpu_count() or 1))


def _blocks() -> dict[str, list[Block]]:
    blocks = {}
    for path in DOC_FILES:
        if path.is_file():
            blocks[path.relative_to(REPO_ROOT).as_posix()] = parse_markdown(path)
    return blocks


BLOCKS = _blocks()


def _cases():
    for blocks in BLOCKS.values():
        for block in blocks:
            if block.kind == "text":
                continue
            marks = []
            directives = block.directives
            if directives.skip is not None:
                marks.append(pytest.mark.skip(reason=f"{block.id}: {directives.skip}"))
            elif block.name == "MODEL_CARD.md" and "{{" in block.code:
                marks.append(
                    pytest.mark.skip(reason=f"{block.id}: template; the rendered card runs in test_model_card.py")
                )
            if directives.slow is not None:
                marks.append(pytest.mark.slow)
            yield pytest.param(block, False, marks=marks, id=block.id)
            if directives.slow_full and directives.skip is None and directives.error is None:
                yield pytest.param(block, True, marks=[pytest.mark.slow], id=f"{block.id}:full")


def _runs_in_session(block: Block) -> bool:
    directives = block.directives
    return (
        block.kind in ("python", "shell")
        and directives.error is None
        and directives.skip is None
        and directives.slow is None
        and not (block.name == "MODEL_CARD.md" and "{{" in block.code)
    )


class FileRun:
    """The working directory, environment and Python session of one documentation file."""

    def __init__(self, blocks: list[Block], text: str, workdir: Path, fixtures: Path):
        self.blocks, self.workdir = blocks, workdir
        prepare_workdir(workdir, fixtures, FIXTURE_PATHS, text)
        self.env = session_environment(workdir)
        self.session: PythonSession | None = None
        self.outcomes: dict[str, Outcome] = {}

    def _execute(self, block: Block) -> Outcome:
        directives = block.directives
        if directives.error:
            return Outcome(False, f"bad doc-test marker: {directives.error}")
        if block.kind == "python":
            if directives.reduced:
                return Outcome(False, "bad doc-test marker: `reduced` applies to shell blocks only")
            if directives.env and not directives.isolated:
                return Outcome(False, "bad doc-test marker: `env` on a Python block needs `isolated` (its own process)")
            timeout = directives.timeout or PYTHON_TIMEOUT
            if directives.isolated:
                log = self.workdir.parent / f"{self.workdir.name}-{block.line}-isolated.log"
                session = PythonSession(self.workdir, session_environment(self.workdir, directives.env), log)
                try:
                    return session.run(block, timeout)
                finally:
                    session.close()
            if self.session is None:
                self.session = PythonSession(self.workdir, self.env, self.workdir.parent / f"{self.workdir.name}.log")
            return self.session.run(block, timeout)
        if directives.isolated:
            return Outcome(False, "bad doc-test marker: `isolated` applies to Python blocks only")
        try:
            return run_shell_block(
                block,
                self.workdir,
                {**self.env, **directives.env},
                REDUCED_ARGS if directives.reduced else None,
                directives.timeout or SHELL_TIMEOUT,
            )
        except MarkerError as error:
            return Outcome(False, f"bad doc-test marker: {error}")

    def run(self, block: Block) -> Outcome:
        for earlier in self.blocks[: self.blocks.index(block)]:
            if earlier.id not in self.outcomes and _runs_in_session(earlier):
                self.outcomes[earlier.id] = self._execute(earlier)
        if block.id not in self.outcomes:
            self.outcomes[block.id] = self._execute(block)
        return self.outcomes[block.id]

    def earlier_failures(self, block: Block) -> list[str]:
        ids = [earlier.id for earlier in self.blocks[: self.blocks.index(block)]]
        return [id_ for id_ in ids if id_ in self.outcomes and not self.outcomes[id_].ok]

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


class DocRunner:
    """
    Runs the cases: each file's blocks in order, different files (and `:full` cases) in parallel threads, started
    for every selected case when the session begins, so that the tests only collect the outcomes.
    """

    def __init__(self, fixtures: Path, root: Path):
        self.fixtures, self.root = fixtures, root
        self.files: dict[str, FileRun] = {}
        self.lock = threading.Lock()
        self.futures: dict[tuple[str, bool], Future] = {}
        self.closing = threading.Event()
        self.executor: ThreadPoolExecutor | None = None

    def file(self, name: str) -> FileRun:
        with self.lock:
            if name not in self.files:
                self.files[name] = FileRun(
                    BLOCKS[name],
                    (REPO_ROOT / name).read_text(encoding="utf-8"),
                    self.root / re.sub(r"[^A-Za-z0-9]+", "-", name),
                    self.fixtures,
                )
            return self.files[name]

    def run_full(self, block: Block) -> Outcome:
        """A `slow-full` block as written, in a working directory of its own."""
        workdir = self.root / (re.sub(r"[^A-Za-z0-9]+", "-", block.id) + "-full")
        prepare_workdir(workdir, self.fixtures, FIXTURE_PATHS, block.code)
        env = {**session_environment(workdir), **block.directives.env}
        return run_shell_block(block, workdir, env, None, block.directives.timeout or 3600.0, full=True)

    def _run(self, block: Block, full: bool) -> tuple[Outcome, list[str]]:
        if full:
            return self.run_full(block), []
        file_run = self.file(block.name)
        return file_run.run(block), file_run.earlier_failures(block)

    def start(self, cases: list[tuple[Block, bool]]) -> None:
        """Start running `cases` in the background: one task per file (in document order) and per `:full` case."""
        tasks: dict[str, list[tuple[Block, bool]]] = {}
        for block, full in cases:
            tasks.setdefault(f"{block.id}:full" if full else block.name, []).append((block, full))
            self.futures[(block.id, full)] = Future()
        self.executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="doc-test")
        # The files with the most shell blocks (the slowest) first.
        for items in sorted(tasks.values(), key=lambda items: -sum(b.kind == "shell" for b, _ in items)):
            self.executor.submit(self._work, items)

    def _work(self, items: list[tuple[Block, bool]]) -> None:
        for block, full in items:
            future = self.futures[(block.id, full)]
            if self.closing.is_set():
                future.set_result((Outcome(False, "not run: the test session is ending"), []))
                continue
            try:
                future.set_result(self._run(block, full))
            except BaseException as error:  # noqa: BLE001 - reported by the test that waits for it
                future.set_exception(error)

    def outcome(self, block: Block, full: bool) -> tuple[Outcome, list[str]]:
        future = self.futures.get((block.id, full))
        return future.result() if future is not None else self._run(block, full)

    def close(self) -> None:
        self.closing.set()
        kill_children()
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        for file_run in self.files.values():
            file_run.close()


@pytest.fixture(scope="session")
def doc_runner(request, tmp_path_factory):
    runner = DocRunner(build_fixtures(tmp_path_factory.mktemp("doc-fixtures")), tmp_path_factory.mktemp("doc-runs"))
    selected = [
        (item.callspec.params["block"], item.callspec.params["full"])
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_doc_block" and item.get_closest_marker("skip") is None
    ]
    runner.start(
        [
            (block, full)
            for block, full in selected
            if block.kind in ("python", "shell") and block.directives.skip is None
        ]
    )
    yield runner
    runner.close()


@pytest.mark.parametrize("block, full", list(_cases()))
def test_doc_block(block: Block, full: bool, doc_runner: DocRunner):
    if block.kind == "indented":
        pytest.fail(
            f"{block.id}: an indented code block has no language, so it cannot be run: fence it with ```bash or "
            "```python (or ```text if it is not code)",
            pytrace=False,
        )
    if block.kind == "unknown":
        pytest.fail(
            f"{block.id}: ```{block.language} blocks cannot be run: use python, bash or console, or text if the "
            "block is not code",
            pytrace=False,
        )
    outcome, earlier = doc_runner.outcome(block, full)
    if not outcome.ok:
        note = f"\n(earlier blocks of this file failed: {', '.join(earlier)})" if earlier else ""
        pytest.fail(f"{block.id} failed after {outcome.seconds:.1f} s:\n{outcome.message}{note}", pytrace=False)


# ----------------------------------------------------------------------------------------------------------------------
# The harness itself
# ----------------------------------------------------------------------------------------------------------------------


def test_doc_files_are_found():
    assert {"README.md", "MODEL_CARD.md", "docs/usage.md", "docs/training.md"} <= set(BLOCKS)
    assert sum(block.kind in ("python", "shell") for blocks in BLOCKS.values() for block in blocks) > 20


def test_markdown_blocks_markers_and_indented_blocks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n"
        "```\ndiagram\n```\n\n"
        "<!-- doc-test: skip (needs a GPU (CUDA)) -->\n\n"
        "```bash\npython x.py\n```\n\n"
        "- a list item\n\n"
        "  <!-- doc-test: slow; env A=1 B=2 -->\n"
        "  ```python\n  import os\n    x = 1\n  ```\n\n"
        "    continued list paragraph, not code\n\n"
        "text\n\n"
        "    python indented.py\n\n"
        "~~~~py\n```\n~~~~\n"
        "<!-- doc-test: frobnicate -->\n"
        "```python\npass\n```\n",
        encoding="utf-8",
    )
    blocks = parse_markdown(page, tmp_path)
    assert [(block.line, block.kind) for block in blocks] == [
        (3, "text"), (9, "shell"), (16, "python"), (25, "indented"), (27, "python"), (31, "python"),
    ]  # fmt: skip
    assert blocks[1].directives.skip == "needs a GPU (CUDA)"
    assert blocks[2].code == "import os\n  x = 1\n" and blocks[2].code_line == 17
    assert blocks[2].directives.slow == "" and blocks[2].directives.env == {"A": "1", "B": "2"}
    assert blocks[3].code == "python indented.py\n"
    assert blocks[4].code == "```\n"
    assert "unknown doc-test directive" in blocks[5].directives.error


@pytest.mark.parametrize(
    "marker, message",
    [
        ("skip", "needs a reason"),
        ("skip ()", "needs a reason"),
        ("slow-full", "only goes with `reduced`"),
        ("reduced isolated", "expected `;`"),
        ("env A", "NAME=VALUE"),
        ("timeout soon", "needs seconds"),
    ],
)
def test_bad_markers_are_explained(marker, message):
    with pytest.raises(MarkerError, match=message):
        parse_directives(marker)


def test_shell_plan_skips_installs_and_appends_reduced_flags():
    code = (
        "# a comment line\n"
        'pip install -e ".[train]"\n'
        'pip install -e ".[train]" && accelerate launch examples/pretrain.py   # note\n'
        "python examples/pretrain.py --train_dir ~/images \\\n    --output_dir out\n"
        "echo '#not a comment' && echo done\n"
    )
    plan = plan_shell_block(code, "bash", {"examples/pretrain.py": ["--max_train_steps", "2"]})
    assert [command.run for command in plan] == [
        None,
        "accelerate launch examples/pretrain.py --max_train_steps 2",
        "python examples/pretrain.py --train_dir ~/images --output_dir out --max_train_steps 2",
        "echo '#not a comment' && echo done",
    ]
    assert plan[0].note == "installs packages: not run"
    console = plan_shell_block("$ python -V\nPython 3.11\n$ echo hi # greet\nhi\n", "console", None)
    assert [command.run for command in console] == ["python -V", "echo hi # greet"]
    assert shlex.split(plan[2].run)[3] == "~/images"


def test_sessions_isolation_warnings_and_shell_blocks(tmp_path):
    """The machinery on a page of its own: a shared session, an isolated block, a deprecation warning, a shell block
    that writes a file the session reads, and an error whose traceback points at the page's line."""
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nx = 1\n```\n\n"
        "<!-- doc-test: isolated; env DOC_TEST_VALUE=7 -->\n```python\nimport os\n"
        "assert 'x' not in globals() and os.environ['DOC_TEST_VALUE'] == '7'\n```\n\n"
        "```python\nimport warnings\nwarnings.warn('old', FutureWarning)\n```\n\n"
        "```bash\nmkdir -p sub && cd sub\necho written > ../note.txt  # a comment\n```\n\n"
        "```python\nfrom pathlib import Path\nassert x == 1 and Path('note.txt').read_text() == 'written\\n'\nraise ValueError('boom')\n```\n",
        encoding="utf-8",
    )
    blocks = parse_markdown(page, tmp_path)
    (tmp_path / "fixtures").mkdir()
    file_run = FileRun(blocks, page.read_text(), tmp_path / "work", tmp_path / "fixtures")
    try:
        outcomes = [file_run.run(block) for block in blocks]
    finally:
        file_run.close()
    assert [outcome.ok for outcome in outcomes] == [True, True, False, True, False], [o.message for o in outcomes]
    assert "FutureWarning" in outcomes[2].message
    assert 'File "page.md", line 24' in outcomes[4].message and "ValueError: boom" in outcomes[4].message
    assert file_run.earlier_failures(blocks[4]) == ["page.md:11"]


def test_reduced_and_full_runs(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- doc-test: reduced; slow-full -->\n```bash\necho examples/pretrain.py --steps 9\n```\n")
    (block,) = parse_markdown(page, tmp_path)
    env = session_environment(tmp_path)
    reduced = run_shell_block(block, tmp_path, env, {"examples/pretrain.py": ["--steps", "2"]}, 60)
    full = run_shell_block(block, tmp_path, env, {"examples/pretrain.py": ["--steps", "2"]}, 60, full=True)
    assert reduced.ok and "examples/pretrain.py --steps 9 --steps 2\n" in reduced.message
    assert full.ok and "examples/pretrain.py --steps 9\n" in full.message and "--steps 2" not in full.message


def test_a_shell_block_stops_at_the_first_failing_command(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\nfalse && echo never\necho after\n```\n")
    (block,) = parse_markdown(page, tmp_path)
    outcome = run_shell_block(block, tmp_path, session_environment(tmp_path), None, 60)
    assert not outcome.ok and "exit code 1 of:\nfalse && echo never\n" in outcome.message
    assert "after" not in outcome.message.split("--- transcript ---")[1]
