"""Bad converter input: one line on stderr, exit code 2, and no output directory left behind."""

import json
import os
import subprocess
import sys

import pytest

from helpers import LLAMA_SHAPES, random_torch_llama, save_torch_llama


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def good_hf(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good") / "hf"
    save_torch_llama(random_torch_llama(seed=11, **LLAMA_SHAPES["mha_untied"]), directory,
                     "safetensors")
    return directory


def copy_dir(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def run_from_hf(src, out, *extra):
    return subprocess.run([sys.executable, "-m", "convert.from_hf", str(src), str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def assert_clean_failure(result, out, *words):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()
    assert not [n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.tmp")]


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_missing_path(tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(run_from_hf(tmp_path / "nope", out), out, "no such file")


def test_directory_without_weights(tmp_path, good_hf):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes((good_hf / "config.json").read_bytes())
    out = tmp_path / "out"
    assert_clean_failure(run_from_hf(src, out), out, "no weights")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors(tmp_path, good_hf, keep):
    src = copy_dir(good_hf, tmp_path / "src")
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    out = tmp_path / "out"
    assert_clean_failure(run_from_hf(src, out), out, "model.safetensors")


def test_garbage_safetensors(tmp_path, good_hf):
    src = copy_dir(good_hf, tmp_path / "src")
    (src / "model.safetensors").write_bytes(os.urandom(4096))
    out = tmp_path / "out"
    assert_clean_failure(run_from_hf(src, out), out, "model.safetensors")


@pytest.mark.parametrize("change,words", [
    (dict(intermediate_size=100), ("mlp", "shape")),                    # mis-shaped tensors
    (dict(num_hidden_layers=2), ("does not use", "model.layers.2.")),   # unused tensors
    (dict(num_hidden_layers=4), ("lacks", "model.layers.3.")),          # missing tensors
    (dict(model_type="mistral", architectures=["MistralForCausalLM"]), ("unsupported architecture",)),
])
def test_config_that_does_not_fit_the_tensors(tmp_path, good_hf, change, words):
    src = copy_dir(good_hf, tmp_path / "src")
    edit_config(src, **change)
    out = tmp_path / "out"
    assert_clean_failure(run_from_hf(src, out), out, *words)


def test_existing_output_is_not_touched(tmp_path, good_hf):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_from_hf(good_hf, out)
    assert result.returncode == 2 and "already exists" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_to_hf_on_a_non_checkpoint(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "convert.to_hf", str(tmp_path), str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_clean_failure(result, out, "not a converted checkpoint")
