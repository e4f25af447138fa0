import pytest
import torch

from kernels import backend
from kernels.backend import use_backend


def test_auto_picks_torch_for_cpu_and_triton_for_cuda(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.requested_backend() == "auto"
    assert not backend.use_triton(torch.device("cpu"))
    assert backend.use_triton(torch.device("cuda"))


def test_env_var_and_context_manager(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert not backend.use_triton(torch.device("cuda"))
    with use_backend("triton"):
        assert backend.requested_backend() == "triton"
        with use_backend("auto"):  # innermost wins, and the outer one comes back on exit
            assert backend.requested_backend() == "auto"
        assert backend.requested_backend() == "triton"
    assert backend.requested_backend() == "torch"


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.use_triton(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with use_backend("triton"):
        assert backend.use_triton(torch.device("cpu"))


def test_unknown_backend_names_the_value(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="'cuda'"):
        backend.requested_backend()
    with pytest.raises(ValueError, match="'tpu'"), use_backend("tpu"):
        pass
