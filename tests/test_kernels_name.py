"""Our `kernels` package must never be taken for the Hugging Face kernel hub of the same name."""

import importlib

import transformers.utils.import_utils as import_utils


def test_transformers_does_not_detect_the_hub_package():
    import kernels

    assert importlib.util.find_spec("kernels") is not None  # ours is importable ...
    import_utils.is_kernels_available.cache_clear()
    assert import_utils.is_kernels_available() is False  # ... and transformers still says no hub
    assert not hasattr(kernels, "get_kernel")
