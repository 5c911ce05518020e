# SPDX-License-Identifier: Apache-2.0
"""The source distribution builds outside the repository: it holds everything setup.py needs,
installs (the simt extension compiled from it), runs, and states its license and the torch it
was compiled against. One version, in packed_kernels/_version.py."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

import packed_kernels as pk

ROOT = Path(__file__).resolve().parents[1]
SOURCE_SUFFIXES = {".h", ".cuh", ".cu", ".cpp"}


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """`python -m build --sdist` of this checkout (no isolation: torch is the one installed)."""
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("sdist")
    result = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation",
                             "--outdir", str(out), str(ROOT)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (archive,) = out.glob("packed_kernels-*.tar.gz")
    return archive


def _members(archive: Path) -> set:
    with tarfile.open(archive) as tar:
        return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


def test_sdist_holds_what_setup_needs(sdist):
    members = _members(sdist)
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
               if p.suffix in SOURCE_SUFFIXES}
    assert sources and sources <= members, f"missing: {sorted(sources - members)}"
    needed = {"setup.py", "pyproject.toml", "tools/build_config.py", "LICENSE", "CHANGELOG.md",
              "README.md", "packed_kernels/py.typed", "packed_kernels/_version.py"}
    assert needed <= members, f"missing: {sorted(needed - members)}"
    assert not [m for m in members if m.endswith((".so", ".o"))], "compiled files in the sdist"


def _install(sdist: Path, target: Path, **build_env) -> Path:
    """pip builds and installs the sdist into `target` (no deps); returns its dist-info."""
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"), **build_env)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation",
                             "--no-deps", "--target", str(target), str(sdist)],
                            capture_output=True, text=True, env=env, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (dist_info,) = target.glob("packed_kernels-*.dist-info")
    return dist_info


def _run_from(target: Path, script: str, cwd: Path) -> str:
    """Runs `script` in a fresh interpreter that imports packed_kernels from `target`."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(target)],
                            capture_output=True, text=True, cwd=cwd, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(target)))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_sdist_installs_and_runs_on_simt(sdist, tmp_path):
    """pip builds the sdist (simt extension only: nvcc builds take minutes) into a folder that
    a fresh interpreter then imports instead of this checkout."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    dist_info = _install(sdist, tmp_path / "site", PACKED_KERNELS_NO_CUDA="1")
    metadata = (dist_info / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    assert f"Requires-Dist: torch=={major}.{minor}.*" in metadata  # the torch it compiled against
    assert re.search(r"Requires-Dist: triton.*extra == \"triton\"", metadata)  # optional
    assert (dist_info / "licenses" / "LICENSE").exists()

    out = _run_from(tmp_path / "site", """
        import sys
        import torch
        import torch.nn.functional as F
        import packed_kernels as pk
        assert pk.__file__.startswith(sys.argv[1]), pk.__file__
        # the emulated kernels follow cuDNN's TF32 switch (on by default), as on a GPU; torch's
        # CPU conv is exact fp32
        torch.backends.cudnn.allow_tf32 = False
        x, w, b = torch.randn(2, 8, 9, 9), torch.randn(12, 2, 3, 3), torch.randn(12)
        out = pk.grouped_conv2d(x, w, b, padding=1, groups=4, backend="simt")
        torch.testing.assert_close(out, F.conv2d(x, w, b, padding=1, groups=4))
        print("ok", pk.__version__)
    """, tmp_path)
    assert f"ok {pk.__version__}" in out


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PACKED_KERNELS_TEST_SDIST_CUDA") != "1",
                    reason="minutes of nvcc: set PACKED_KERNELS_TEST_SDIST_CUDA=1")
def test_sdist_builds_the_cuda_extension(sdist, tmp_path):
    """The CUDA extension from the sdist (one architecture, sm_80, to keep it short); on a GPU
    it also runs."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if not (Path(cuda_home) / "bin" / "nvcc").exists():
        pytest.skip(f"no nvcc in {cuda_home} (set CUDA_HOME)")
    _install(sdist, tmp_path / "site", PACKED_KERNELS_NO_SIMT="1", PACKED_KERNELS_CUDA_ARCHS="80",
             CUDA_HOME=cuda_home)
    out = _run_from(tmp_path / "site", """
        import sys
        import torch
        import torch.nn.functional as F
        import packed_kernels as pk
        from packed_kernels import _C  # noqa: F401  (imports without a GPU too)
        assert pk.__file__.startswith(sys.argv[1]), pk.__file__
        if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
            torch.backends.cudnn.allow_tf32 = False  # both convs exact fp32: TF32 rounds apart
            x, w = torch.randn(2, 8, 9, 9, device="cuda"), torch.randn(12, 2, 3, 3, device="cuda")
            out = pk.grouped_conv2d(x, w, padding=1, groups=4, backend="cuda")
            torch.testing.assert_close(out, F.conv2d(x, w, padding=1, groups=4))
        print("ok")
    """, tmp_path)
    assert "ok" in out


def test_one_version():
    """pyproject reads packed_kernels/_version.py; the changelog's newest entry is that version."""
    assert re.fullmatch(r"\d+\.\d+\.\d+", pk.__version__)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'version = {attr = "packed_kernels._version.__version__"}' in pyproject
    assert not re.search(r'^version\s*=\s*"', pyproject, re.M), "a second, literal version"
    newest = re.search(r"^## \[?(\d+\.\d+\.\d+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert newest and newest.group(1) == pk.__version__
    try:
        installed = importlib.metadata.version("packed_kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    assert installed == pk.__version__, "reinstall: the installed metadata is stale"


def test_license():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer


def test_an_extension_built_for_another_torch_says_so(monkeypatch):
    from packed_kernels import _backend
    error = "ImportError: _simt.so: undefined symbol: _ZN3c106detail14torchCheckFailEPKc"
    monkeypatch.setattr(_backend, "_import_error", lambda module: error)
    with pytest.raises(_backend.BackendUnavailableError,
                       match=rf"compiled against another torch than this one \({re.escape(torch.__version__)}\)"):
        _backend.extension("_simt")


def test_every_source_file_has_the_spdx_line():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import spdx_headers
    finally:
        sys.path.pop(0)
    files = spdx_headers.source_files()
    assert len(files) > 50
    missing = [str(p.relative_to(ROOT)) for p in files if not spdx_headers.has_header(p.read_text())]
    assert not missing, f"no SPDX line (run python tools/spdx_headers.py): {missing}"
    script = "#!/usr/bin/env python\n\"\"\"doc\"\"\"\n"
    assert spdx_headers.with_header(Path("x.py"), script) == \
        "#!/usr/bin/env python\n# SPDX-License-Identifier: Apache-2.0\n\"\"\"doc\"\"\"\n"
