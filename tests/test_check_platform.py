"""tools/check_platform.py builds its environment from Colab's published versions: the plan it installs."""
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_platform", REPO / "tools" / "check_platform.py")
check_platform = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_platform)


@pytest.mark.skipif(not check_platform.COLAB_FREEZE.is_file(), reason="Colab's package list (../shared/platforms) absent")
def test_the_kit_is_installed_at_colabs_versions_and_only_missing_packages_at_the_kits():
    colab = check_platform.colab_versions()
    requirements, constraints = check_platform.install_plan(colab)
    for pinned in ("torch==2.11.0", "torchvision==0.26.0", "numpy==2.1.3", "wandb==0.28.1", "matplotlib==3.10.0",
                   "ipykernel==6.17.1", "diffusers==0.39.0"):
        assert pinned in requirements  # Colab's, local build tag (+cu128) dropped: PyPI's build of that release
    assert "clean-fid==0.1.35" in requirements and "pytest-timeout>=2.3" in requirements  # Colab lacks them
    assert "-r requirements.txt" not in requirements and len(requirements) == len(set(requirements))
    assert "jupyter-client==7.4.9" in constraints and "packaging==26.3" in constraints  # dependencies: Colab's too
    assert "scipy==1.16.3" in requirements
    assert not [c for c in constraints if c.startswith(("nvidia-", "triton", "torch==", "numpy=="))]


def test_an_older_torch_replaces_the_platforms(tmp_path):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("# header\ntorch==2.11.0+cu128\ntorchvision==0.26.0+cu128\nnumpy==2.1.3\n"
                      "google-colab @ file:///colabtools/dist/google_colab-1.0.0.tar.gz\nnvidia-nccl-cu12==2.28.9\n")
    platform = check_platform.colab_versions(freeze)
    assert platform == {"torch": "2.11.0", "torchvision": "0.26.0", "numpy": "2.1.3", "nvidia-nccl-cu12": "2.28.9"}
    requirements, constraints = check_platform.install_plan(platform, overrides={"torch": "2.4.0",
                                                                                 "torchvision": "0.19.0"})
    assert requirements[:3] == ["torch==2.4.0", "torchvision==0.19.0", "numpy==2.1.3"]
    assert constraints == []


def test_a_torch_older_than_the_oldest_supported_is_refused_with_the_fix(tmp_path, monkeypatch):
    """torch 2.3 has no is_bf16_supported(including_emulation=...): every GPU run with --amp auto would crash."""
    import utils

    monkeypatch.setattr(utils.torch, "__version__", "2.3.1+cu121")
    with pytest.raises(utils.ConfigError, match=r"^torch 2\.3\.1\+cu121 is older than 2\.4, the oldest this kit "
                                                r"supports: install torch >= 2\.4"):
        utils.train_diffusion(save_folder=str(tmp_path / "run"), data_path=str(tmp_path))
    assert not (tmp_path / "run").exists()
    for version in ("2.4.0", "2.11.0+cu128", "2.14.1", "3.0.0a0"):
        utils.check_torch_version(version)
