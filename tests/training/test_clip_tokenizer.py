"""The offline CLIP BPE tokenizer reproduces CLIP's ids, pads with zeros and keeps the end token."""

from pathlib import Path

import torch

from training.tokenizer import ClipTokenizer

SOT, EOT = 49406, 49407


def test_known_caption_gets_clips_ids(tokenizer):
    ids = tokenizer(["a photo of a cat"])
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT]
    assert ids[0, 7:].eq(0).all()


def test_cleaning_lowercases_unescapes_and_collapses_spaces(tokenizer):
    assert tokenizer(["A  PHOTO of\ta Cat"]).equal(tokenizer(["a photo of a cat"]))
    assert tokenizer.decode(tokenizer(["Tom &amp; Jerry"])[0]) == "tom & jerry"


def test_long_text_is_truncated_with_the_end_token_kept(tokenizer):
    ids = tokenizer(["one two three " * 40], context_length=16)
    assert ids.shape == (1, 16)
    assert ids[0, 0] == SOT and ids[0, -1] == EOT and ids[0].ne(0).all()


def test_decode_round_trips_words_punctuation_and_unicode(tokenizer):
    for text in ["a red car, parked at night!", "naïve café 😀", "日本語"]:
        assert tokenizer.decode(tokenizer([text])[0]) == text.replace(",", " ,").replace("!", " !")


def test_batch_rows_are_independent(tokenizer):
    batch = tokenizer(["a dog", "a photo of two dogs on a beach"])
    assert batch[0].equal(tokenizer(["a dog"])[0])
    assert batch[1].equal(tokenizer(["a photo of two dogs on a beach"])[0])


def test_vocabulary_and_licence_ship_with_the_package():
    assets = Path(__file__).parents[2] / "training" / "assets"
    assert ClipTokenizer().vocab_size == 49408
    assert "OpenAI" in (assets / "LICENSE-clip-bpe.txt").read_text()
