"""What a built wheel carries: the engines' family profiles and the shapes model's files, found
from an installed copy rather than a checkout."""

import os
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, unpacked as site-packages would hold it."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), REPO], check=True,
                   capture_output=True)
    (wheel,) = [p for p in os.listdir(out) if p.endswith(".whl")]
    site = out / "site"
    with zipfile.ZipFile(out / wheel) as archive:
        archive.extractall(site)
        names = archive.namelist()
    return site, names


def test_the_wheel_ships_the_engine_profiles_and_finds_them_installed(installed):
    site, names = installed
    assert {f"fastdiff/engines/family_profiles/{f}.json" for f in ("sd-turbo", "sd15", "sdxl", "sd3", "shapes")} \
        <= set(names)
    code = ("import fastdiff.engines.profiles as p; print(p.PROFILES_DIR); "
            "print(','.join(p.family_profile_names())); print(p.load_family_profile('sd-turbo')['resolutions'])")
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=str(site))
    assert result.returncode == 0, result.stderr
    folder, families, resolutions = result.stdout.strip().splitlines()
    assert folder.startswith(str(site))   # the installed copy's, not the checkout's
    assert {"sd-turbo", "sdxl", "shapes"} <= set(families.split(",")) and "512" in resolutions


def test_the_wheel_ships_the_shapes_model(installed):
    site, names = installed
    assert "fastdiff/shapes/weights/unet/diffusion_pytorch_model.safetensors" in names
    assert "fastdiff/shapes/weights/model_index.json" in names
