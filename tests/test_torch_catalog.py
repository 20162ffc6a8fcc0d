"""catalog/torch.py: PyTorch's CUDA builds per torch minor, NVIDIA's driver minima, the torch trio."""

from __future__ import annotations

import pytest

from provisioner.catalog import torch as torches


def test_flavour_names_and_the_torch_trio() -> None:
    assert torches.flavour("12.8") == "cu128" and torches.flavour("13.0") == "cu130"
    assert torches.requirements("2.9") == ("torch==2.9.*", "torchvision==0.24.*", "torchaudio==2.9.*")
    assert torches.requirements("2.6.0") == ("torch==2.6.0", "torchvision==0.21.0", "torchaudio==2.6.0")
    assert torches.torchvision_of("2.9.1") == "0.24.1" and torches.torchvision_of("2.11") == "0.26"
    assert torches.minor_of("2.10.1") == "2.10" and torches.minor_of("latest") is None
    with pytest.raises(ValueError, match="not a torch version"):
        torches.requirements("2")


@pytest.mark.parametrize(("installed", "wanted", "same"), [
    ("2.9.1+cu128", "2.9", True), ("2.9.1+cu128", "2.9.1", True), ("2.9.0", "2.9.1", False),
    ("2.10.0+cu128", "2.1", False), ("2.9.1", "2.9.1", True), ("2.6.0a0+ecf3bae40a.nv25.01", "2.6", False),
    ("2.9.0.dev20250801+cu128", "2.9", False), ("not-a-version", "2.9", False),
])
def test_an_installed_torch_is_the_profiles_release(installed: str, wanted: str, same: bool) -> None:
    assert torches.matches(installed, wanted) is same


@pytest.mark.parametrize(("minor", "driver", "cuda"), [
    ("2.6", "550.120", "12.4"),          # 12.6 needs 560.28.03
    ("2.6", "570.133.07", "12.6"),
    ("2.8", "570.133.07", "12.8"),       # 12.9 needs 575.51.03
    ("2.9", "580.65.06", "13.0"),
    ("2.9", "580.65.05", "12.8"),
    ("2.8", "550.120", None),            # 2.8 starts at 12.6
    ("2.5", "530.30.02", "11.8"),        # 12.1's minimum is not in the collected table: never chosen
    ("3.0", "580.65.06", None),          # a torch the catalog does not know
])
def test_auto_picks_the_newest_build_the_driver_runs(minor: str, driver: str, cuda: str | None) -> None:
    assert torches.newest_supported(minor, driver) == cuda


def test_every_published_build_has_a_driver_minimum_but_cuda_12_1() -> None:
    published = {c for cudas in torches.FLAVOURS.values() for c in cudas}
    assert published - set(torches.DRIVER_MIN) == {"12.1"}
    assert torches.driver_supports("545.23.08", "12.1") is None and torches.driver_supports("garbage", "12.8") is None
    assert set(torches.FLAVOURS) == set(torches.TORCHVISION)
