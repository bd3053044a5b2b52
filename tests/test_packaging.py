"""The wheel installs `gemma_jax.sharding` and `gemma_jax.configs` (not top-level `sharding`/`configs`, which
PyPI distributions and users' own projects also name), with the presets as package data."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).parent.parent


def test_wheel_in_a_fresh_venv_beside_a_users_own_configs_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True, timeout=600)  # fmt: skip
    wheel = next((tmp_path / "dist").glob("gemma_jax-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)  # dependencies from this environment
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, str(wheel)],
                   check=True, capture_output=True, timeout=600)  # fmt: skip

    project = tmp_path / "project"  # a user's project with packages named like ours used to be
    for name in ("configs", "sharding"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text("OWNER = 'user'\n")
    script = (
        "import configs, sharding, gemma_jax, gemma_jax.configs, gemma_jax.sharding\n"
        "assert configs.OWNER == sharding.OWNER == 'user', 'the user project\\'s own packages'\n"
        "assert gemma_jax.__file__.startswith(%r), gemma_jax.__file__\n"
        "assert 'gemma2-2b' in gemma_jax.configs.model_preset_names()\n"
        "model = gemma_jax.load('tiny', dtype='float32')\n"
        "print(model.generate([[2, 5, 9]], max_new_tokens=3))\n"
    ) % site
    env = {**os.environ, "GEMMA_JAX_CACHE": str(tmp_path / "cache"), "PYTHONPATH": "", "JAX_PLATFORMS": "cpu"}
    run = lambda *args: subprocess.run([python, *args], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    loaded = run("-c", script)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    planned = run("-m", "gemma_jax.cli", "plan", "--model", "gemma2-2b", "--chip", "v5e", "--mesh", "tensor=4")
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert "fits" in planned.stdout
