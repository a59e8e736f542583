"""Shared fixtures for the training tests: a tiny transformers CLIP teacher on disk, the tokenizer."""

import pytest
import torch

from siclip.training.tokenizer import ClipTokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return ClipTokenizer()


@pytest.fixture(scope="session")
def hf_teacher_dir(tmp_path_factory):
    """A randomly initialised transformers CLIPModel (4 layers, width 64) saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("hf_clip_teacher")
    CLIPModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def hf_teacher(hf_teacher_dir):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(hf_teacher_dir).eval()


@pytest.fixture(scope="package", autouse=True)
def one_cpu_thread():
    """Tiny models run fastest on one thread, and a busy shared CPU stalls multi-threaded kernels."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
