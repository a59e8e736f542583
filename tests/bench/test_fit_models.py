"""bench fit's --models: a comma inside an override's JSON list does not split one model spec into two."""

from bench.fit import split_models


def test_models_split_on_commas_outside_json_lists():
    spec = 'tiny:image.block=["preln","sasp","sasp","sasp"]:image.share_attention=[[2,3]]'
    assert split_models(f"tiny_preln,{spec},open_clip") == ["tiny_preln", spec, "open_clip"]
    assert split_models("tiny") == ["tiny"]
