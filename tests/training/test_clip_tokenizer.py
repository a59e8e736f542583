"""The offline CLIP BPE tokenizer reproduces CLIP's ids, pads with zeros and keeps the end token."""

import pickle
from pathlib import Path

import pytest
import torch

from siclip.training.tokenizer import ClipTokenizer

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
    import siclip.training.tokenizer as tokenizer_module

    assets = Path(tokenizer_module.__file__).parent / "assets"  # where the package is, checkout or install
    assert ClipTokenizer().vocab_size == 49408
    assert "OpenAI" in (assets / "LICENSE-clip-bpe.txt").read_text()


# Expected ids from OpenAI CLIP's algorithm: ftfy.fix_text, HTML unescape, whitespace, lower case, then BPE.
# The ids are those of the repaired ASCII text (e.g. "women's"), which every CLIP tokenizer agrees on.
CLIP_CASES = [
    ("women’s", [1507, 568]),  # curly apostrophe: "women" + "'s"
    ("“quoted” words", [257, 27706, 257, 2709]),  # curly double quotes become '"'
    ("don’t it‘s", [847, 713, 585, 568]),
    ("cafe\u0301 nai\u0308ve", [15304, 1097, 35689, 563]),  # decomposed accents compose to "café naïve"
    ("ﬁsh ﬂower", [2759, 4055]),  # ligatures
    ("ＡＢＣ ｆｕｌｌ width", [5334, 1476, 23571]),  # full-width letters
    ("Ｈｅｌｌｏ，ｗｏｒｌｄ！", [3306, 267, 1002, 256]),  # and full-width punctuation
    ("Ã©lan", [3459, 4872]),  # mojibake: UTF-8 read as Latin-1, repaired to "élan"
]


@pytest.mark.parametrize("text, ids", CLIP_CASES, ids=[c[0] for c in CLIP_CASES])
def test_texts_ftfy_repairs_get_clips_ids(tokenizer, text, ids):
    assert tokenizer([text])[0, : len(ids) + 2].tolist() == [SOT, *ids, EOT]


def test_special_tokens_are_openais_strings(tokenizer):
    assert (tokenizer.decoder[SOT], tokenizer.decoder[EOT]) == ("<|startoftext|>", "<|endoftext|>")
    # as in OpenAI's tokenizer, the strings inside a text are the special tokens themselves
    assert tokenizer.encode("a <|endoftext|> b") == [320, EOT, 321]


def test_the_tokenizer_pickles_and_works_in_a_spawned_data_loader_worker(tokenizer):
    texts = ["women’s shoes", "a photo of a cat", "ﬁsh"]
    tokenizer(texts)  # fill the BPE cache: it must not travel (nor break pickling)
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone(texts).equal(tokenizer(texts))
    loader = torch.utils.data.DataLoader(texts, batch_size=3, collate_fn=tokenizer, num_workers=1,
                                         multiprocessing_context="spawn")
    (batch,) = list(loader)
    assert batch.equal(tokenizer(texts))
