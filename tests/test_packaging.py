"""The package's import layout: kernels/ and integrations/ exist only as gradcodec.kernels and
gradcodec.integrations (setup.py's package_dir), never as top-level modules that would shadow the
unrelated PyPI package `kernels`, which transformers probes for."""
import importlib.util
from pathlib import Path

import gradcodec

ROOT = Path(__file__).resolve().parents[1]


def test_the_repo_folders_are_importable_only_under_gradcodec():
    import gradcodec.integrations
    import gradcodec.kernels

    assert Path(gradcodec.kernels.__file__).resolve().parent == ROOT / "kernels"
    assert Path(gradcodec.integrations.__file__).resolve().parent == ROOT / "integrations"
    assert Path(gradcodec.__file__).resolve().parent == ROOT / "gradcodec"
    for name in ("kernels", "integrations"):
        spec = importlib.util.find_spec(name)  # in the tests' own interpreter (pytest.ini: --import-mode=importlib)
        assert spec is None or not Path(spec.origin or "").resolve().is_relative_to(ROOT), (name, spec)
