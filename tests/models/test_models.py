import time

import pytest
import torch
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel

from lit_cascades.models import (
    CNN,
    MLP,
    build_classifier,
    count_parameters,
    load_pretrained,
    resolve_pretrained,
)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_classifiers_take_any_image_shape(shape):
    for net in (MLP(shape, 7, hidden=[5]), CNN(shape, 7, width=4, depth=3)):
        assert net(torch.randn(2, *shape)).shape == (2, 7)
    assert count_parameters(MLP((1, 8, 8), 10, hidden=[])) == 64 * 10 + 10


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'resnet'.*cnn"):
        build_classifier("resnet", (1, 8, 8), 10)


def test_hub_id_while_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache.*offline"):
        resolve_pretrained("some-org/definitely-not-cached-model")
    assert time.time() - start < 5
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_pretrained("./no/such/dir")


def test_local_directory_loads(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=50, n_positions=16))
    model.save_pretrained(tmp_path)
    assert resolve_pretrained(tmp_path) == str(tmp_path)
    assert load_pretrained(AutoConfig, tmp_path).n_embd == 8
