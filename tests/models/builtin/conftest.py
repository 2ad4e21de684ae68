"""The ``micro`` built-in model, pretrained once into a temporary cache for every test of this package."""

import pytest

from fedexperts.models.builtin import default_model_path


@pytest.fixture(scope="package")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDEXPERTS_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="package")
def built(cache):
    return default_model_path("micro", progress=False)
