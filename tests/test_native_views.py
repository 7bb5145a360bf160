"""The CPU view kernels (`stellar_hf/view_kernels.c` through `stellar_hf.native`).

Their colours against torchvision's per-view operations and the eager batched path, on edge colours and every
operation at every position; views independent of the thread split; the fallback when no compiler is found; and the
cached library under a build killed at every point of its write.
"""

import itertools
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from stellar_hf import native
from stellar_hf.data import (
    COLOR_BLUR,
    COLOR_FACTORS,
    COLOR_GRAY,
    COLOR_JITTER,
    COLOR_ORDER,
    COLOR_PARAMETERS,
    COLOR_SIGMA,
    ColorAugmentation,
    MultiViewTransform,
    ViewAugmentation,
)

from test_views import edge_colours

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parameters_for(count, order=(0, 1, 2, 3), factors=(1.2, 0.7, 1.1, 0.05), jitter=True, gray=False, sigma=None):
    """(count, COLOR_PARAMETERS): the same colour parameters for each of `count` views."""
    row = torch.zeros(COLOR_PARAMETERS)
    row[COLOR_JITTER] = float(jitter)
    row[COLOR_FACTORS] = torch.tensor(factors)
    row[COLOR_ORDER] = torch.tensor(order, dtype=torch.float32)
    row[COLOR_GRAY] = float(gray)
    row[COLOR_BLUR] = float(sigma is not None)
    row[COLOR_SIGMA] = sigma or 0.0
    return row.expand(count, -1).clone()


def reference_colours(views, parameters, color=ColorAugmentation()):
    transform = MultiViewTransform(32, 1, 0, 16, **_settings(color))
    return torch.stack([transform.color_view(view, row) for view, row in zip(views, parameters)])


def _settings(color):
    names = {"jitter_p": "color_jitter_p"}
    return {names.get(key, key): value for key, value in vars(color).items()}


@pytest.mark.parametrize("shift", [-0.5, -0.3, -0.1, 0.0, 0.05, 0.25, 0.5])
def test_hue_rotation_matches_torchvision_on_edge_colours(native_kernels, shift):
    views = edge_colours()
    parameters = parameters_for(1, order=(3, 0, 1, 2), factors=(1.0, 1.0, 1.0, shift))
    color = ColorAugmentation(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.5)
    actual = ViewAugmentation(color, native=True).color_views(views, parameters)
    torch.testing.assert_close(actual[0], TF.adjust_hue(views[0], shift).clamp(0, 1), atol=1e-6, rtol=0)


def test_every_operation_at_every_position_matches_the_reference(native_kernels):
    # Each of the 24 orders, with and without grayscale, each with its own blur (none, and radii 0 to 4), on views
    # whose pixel count is not a multiple of the kernels' tile, and with a contrast first (its mean read before any
    # pass) as often as anywhere else.
    generator = torch.Generator().manual_seed(0)
    orders = list(itertools.permutations(range(4)))
    rows = []
    for index, order in enumerate(orders * 2):
        factors = (0.6 + 0.8 * torch.rand(3, generator=generator)).tolist()
        factors.append(0.2 * torch.rand(1, generator=generator).item() - 0.1)
        sigma = (None, 0.1, 0.25, 0.45, 0.6, 1.9)[index % 6]
        rows.append(parameters_for(1, order, factors, gray=index >= len(orders), sigma=sigma))
    parameters = torch.cat(rows)
    views = torch.rand(len(parameters), 3, 29, 37, generator=generator)
    expected = reference_colours(views, parameters)
    actual = ViewAugmentation(native=True).color_views(views, parameters)
    torch.testing.assert_close(actual, expected, atol=2e-6, rtol=0)
    # Each within 2e-6 of the reference, so within twice that of each other.
    eager = ViewAugmentation(native=False).color_views(views, parameters)
    torch.testing.assert_close(actual, eager, atol=4e-6, rtol=0)
    # No jitter drawn, and views just longer than the blur's radius.
    small = torch.rand(3, 3, 5, 6, generator=generator)
    plain = torch.cat([parameters_for(1, jitter=False, sigma=2.0), parameters_for(2, sigma=0.7, gray=True)])
    actual = ViewAugmentation(native=True).color_views(small, plain)
    torch.testing.assert_close(actual, reference_colours(small, plain), atol=2e-6, rtol=0)


def test_views_do_not_depend_on_the_thread_split_or_on_writing_in_place(native_kernels):
    color = ColorAugmentation(jitter_p=0.9, grayscale_p=0.3, blur_p=0.6)
    transform = MultiViewTransform(40, 7, 0, 16, **_settings(color))
    parameters = transform.draw(40, 40, torch.Generator().manual_seed(3)).color_parameters
    views = torch.rand(7, 3, 40, 40, generator=torch.Generator().manual_seed(4))
    augmentation = ViewAugmentation(color, native=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = augmentation.color_views(views, parameters)
        torch.set_num_threads(3)
        split = augmentation.color_views(views, parameters)
        in_place = augmentation.color_views_(views.clone(), parameters)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split, alone) and torch.equal(in_place, alone)
    for index in (0, 4):
        one = slice(index, index + 1)
        assert torch.equal(augmentation.color_views(views[one], parameters[one]), alone[one])


def test_views_in_any_layout_are_read_as_they_are(native_kernels):
    # Non-contiguous views (a channels-last batch, a crop of a larger one) are read through a copy; `out` is separate.
    parameters = torch.cat([parameters_for(2, sigma=0.9), parameters_for(1, order=(3, 2, 1, 0), gray=True)])
    larger = torch.rand(3, 3, 30, 33, generator=torch.Generator().manual_seed(5))
    for views in (larger[:, :, 2:27, 3:31], larger.contiguous(memory_format=torch.channels_last)):
        assert not views.is_contiguous()
        out = torch.empty(views.shape)
        colored = ViewAugmentation(native=True).color_views(views, parameters, out=out)
        assert colored is out
        torch.testing.assert_close(out, reference_colours(views, parameters), atol=2e-6, rtol=0)


def test_bad_input_is_refused_with_the_reason(native_kernels):
    augmentation = ViewAugmentation(native=True)
    parameters = parameters_for(2)
    with pytest.raises(ValueError, match="parameters must be"):
        augmentation.color_views(torch.rand(2, 3, 16, 16), parameters[:1])
    with pytest.raises(ValueError, match="RGB"):
        augmentation.color_views(torch.rand(2, 1, 16, 16), parameters)
    with pytest.raises(ValueError, match="float32"):
        augmentation.color_views(torch.rand(2, 3, 16, 16, dtype=torch.float64), parameters)
    with pytest.raises(ValueError, match="longer than 4"):
        augmentation.color_views(torch.rand(2, 3, 4, 16), parameters)
    with pytest.raises(ValueError, match="two different kernels"):
        ViewAugmentation(compile=True, native=True)
    # The default path takes what the kernels cannot, eagerly.
    small = torch.rand(2, 3, 4, 16)
    torch.testing.assert_close(
        ViewAugmentation().color_views(small, parameters), reference_colours(small, parameters), atol=2e-6, rtol=0
    )


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty kernel cache folder for this test, and no library loaded from another."""
    monkeypatch.setenv("STELLAR_HF_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setattr(native, "_loaded", {})
    return tmp_path / "kernels"


def libraries(folder):
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def test_without_a_compiler_the_eager_path_colours_and_says_why(fresh_cache, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/bin/cc")
    views, parameters = torch.rand(3, 3, 20, 20), parameters_for(3, sigma=1.0)
    with caplog.at_level("WARNING", logger="stellar_hf.native"):
        colored = ViewAugmentation().color_views(views, parameters)
    assert "/nonexistent/bin/cc" in caplog.text and "eager torch path" in caplog.text
    assert torch.equal(colored, ViewAugmentation(native=False).color_views(views, parameters))
    with pytest.raises(native.NativeKernelsUnavailable, match="/nonexistent/bin/cc"):
        ViewAugmentation(native=True).color_views(views, parameters)
    assert "/nonexistent/bin/cc" in native.why_unavailable()
    assert libraries(fresh_cache) == [], "a failed build leaves nothing behind"


def test_an_unwritable_cache_folder_is_named_with_the_way_out(fresh_cache, monkeypatch, tmp_path):
    blocked = tmp_path / "a file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("STELLAR_HF_KERNEL_CACHE", str(blocked / "kernels"))
    with pytest.raises(native.NativeKernelsUnavailable, match="STELLAR_HF_KERNEL_CACHE to a writable folder"):
        native.require_view_kernels()


def test_a_compiler_without_the_x86_64_levels_builds_with_the_extensions_named(native_kernels, fresh_cache, tmp_path,
                                                                             monkeypatch):  # fmt: skip
    # GCC before 11 knows no -march=x86-64-v3/v4: the build retries with -mavx2 ... (or, last, no flags), and the
    # library is readable by every user of a shared cache.
    if len(native._flag_choices(native._capability())) < 2:
        pytest.skip(f"one set of build flags on this CPU ({native._capability()}): nothing to fall back from")
    wrapper = tmp_path / "old-cc"
    real = " ".join(native.compiler())
    wrapper.write_text(
        "#!/bin/sh\nfor argument in \"$@\"; do case $argument in -march=x86-64-v*) "
        "echo \"cc1: error: bad value ($argument) for -march= switch\" >&2; exit 1;; esac; done\n"
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    assert native.require_view_kernels() is not None
    (library,) = libraries(fresh_cache)
    assert (fresh_cache / library).stat().st_mode & 0o755 == 0o755
    views, parameters = torch.rand(2, 3, 16, 16), parameters_for(2, sigma=1.1)
    torch.testing.assert_close(
        ViewAugmentation(native=True).color_views(views, parameters), reference_colours(views, parameters),
        atol=2e-6, rtol=0,
    )  # fmt: skip


def test_the_kernels_can_be_turned_off(fresh_cache, monkeypatch):
    monkeypatch.setenv("STELLAR_HF_NATIVE", "0")
    assert native.view_kernels() is None and "STELLAR_HF_NATIVE" in native.why_unavailable()


def test_a_compiler_error_is_reported_with_its_message(fresh_cache, monkeypatch, tmp_path):
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'view_kernels.c:1: error: out of cheese' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    with pytest.raises(native.NativeKernelsUnavailable, match="out of cheese"):
        native.require_view_kernels()
    assert libraries(fresh_cache) == []


def test_a_compiler_that_hangs_is_killed_with_its_passes(fresh_cache, monkeypatch, tmp_path):
    # The compiler driver's own children (cc1, as, ld) go with it: here a `sleep` the fake driver started.
    hanging, started = tmp_path / "cc", tmp_path / "pass.pid"
    hanging.write_text(f'#!/bin/sh\n[ "$1" = --version ] && exit 1\nsleep 60 &\necho $! > {started}\nwait\n')
    hanging.chmod(0o755)
    monkeypatch.setenv("CC", str(hanging))
    monkeypatch.setattr(native, "BUILD_TIMEOUT_S", 1)
    with pytest.raises(native.NativeKernelsUnavailable, match="took over 1 s"):
        native.require_view_kernels()
    compiler_pass = int(started.read_text())
    for _ in range(50):  # the kill is delivered at once; reaping by init may take a moment
        try:
            os.kill(compiler_pass, 0)
        except ProcessLookupError:
            break
        if open(f"/proc/{compiler_pass}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the compiler's child pass outlived the timeout")
    assert libraries(fresh_cache) == []


# A child that builds the kernels into $STELLAR_HF_KERNEL_CACHE when told to: `native.py` loaded on its own (torch,
# not the package), so that the parent can time its kill from the start of the build.
BUILDER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("native", sys.argv[1])
native = importlib.util.module_from_spec(spec)
spec.loader.exec_module(native)
print("ready", flush=True)
sys.stdin.readline()
native.require_view_kernels()
print("built", flush=True)
"""


def test_a_build_killed_at_any_point_leaves_no_partial_library(native_kernels, tmp_path, monkeypatch):
    # A real build in a child process, killed (with its compiler) after a growing delay: before it starts, while the
    # compiler writes, around the rename, after it. The folder then holds no library under its final name or a whole
    # one, and a restart loads or builds the kernels, which colour as the eager path does.
    views = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    parameters = parameters_for(2, order=(1, 3, 0, 2), sigma=1.3)
    eager = ViewAugmentation(native=False).color_views(views, parameters)
    seen = []
    # None: killed once the child says the build is done (after the rename, however slow the machine).
    for attempt, delay in enumerate((0.0, 0.05, 0.15, 0.3, 0.5, 0.8, None)):
        folder = tmp_path / f"kill-{attempt}"
        environment = {**os.environ, "STELLAR_HF_KERNEL_CACHE": str(folder)}
        child = subprocess.Popen([sys.executable, "-c", BUILDER, native.__file__], env=environment, text=True,
                                 start_new_session=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        assert child.stdout.readline().strip() == "ready"
        child.stdin.write("go\n")
        child.stdin.flush()
        if delay is None:
            assert child.stdout.readline().strip() == "built"
        else:
            time.sleep(delay)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        finals = [name for name in libraries(folder) if not name.startswith(".")]
        seen.append("built" if finals else ("temporary" if libraries(folder) else "nothing"))
        assert len(finals) <= 1
        monkeypatch.setenv("STELLAR_HF_KERNEL_CACHE", str(folder))
        monkeypatch.setattr(native, "_loaded", {})
        colored = ViewAugmentation(native=True).color_views(views, parameters)
        torch.testing.assert_close(colored, eager, atol=4e-6, rtol=0)
    # The delays span the build: some kills came before the library was whole, the last after.
    assert seen[-1] == "built" and "built" not in seen[:2] and "temporary" in seen, seen
    # What killed builds left is removed by a later build once it is older than any running build could be.
    leftovers = [path for folder in tmp_path.iterdir() for path in folder.glob(".view_kernels-*.tmp")]
    for path in leftovers:
        os.utime(path, (time.time() - 3 * native.BUILD_TIMEOUT_S,) * 2)
        native._remove_stale_temporaries(path.parent)
        assert not path.exists()


def test_a_build_that_dies_before_its_rename_leaves_nothing(native_kernels, fresh_cache, monkeypatch, caplog):
    def dies(*args):
        raise KeyboardInterrupt  # killed between the compile and the rename

    with monkeypatch.context() as patch:
        patch.setattr(native.os, "replace", dies)
        with pytest.raises(KeyboardInterrupt):
            native.require_view_kernels()
    assert libraries(fresh_cache) == [], "the temporary file is removed, nothing is under the final name"
    monkeypatch.setattr(native, "_loaded", {})
    assert native.require_view_kernels() is not None
    assert libraries(fresh_cache) == [native.library_path().name]


def test_a_damaged_library_is_rebuilt(native_kernels, fresh_cache, monkeypatch, caplog):
    # A file under the library's name that does not load (a truncated copy): warned about, built again, loaded.
    path = native.library_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x7fELF truncated")
    with caplog.at_level("WARNING", logger="stellar_hf.native"):
        library = native.require_view_kernels()
    assert "rebuilding" in caplog.text and libraries(fresh_cache) == [path.name]
    views, parameters = torch.rand(2, 3, 12, 12), parameters_for(2, sigma=0.8)
    torch.testing.assert_close(
        ViewAugmentation(native=True).color_views(views, parameters), reference_colours(views, parameters),
        atol=2e-6, rtol=0,
    )  # fmt: skip
    assert library is native.require_view_kernels()
