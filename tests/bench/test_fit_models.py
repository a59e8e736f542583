"""bench fit's --models: a comma inside an override's JSON list does not split one model spec into two, and a
malformed spec exits in one line before any work."""

import pytest

from bench.fit import main, split_models


def test_models_split_on_commas_outside_json_lists():
    spec = 'tiny:image.block=["preln","sasp","sasp","sasp"]:image.share_attention=[[2,3]]'
    assert split_models(f"tiny_preln,{spec},open_clip") == ["tiny_preln", spec, "open_clip"]
    assert split_models("tiny") == ["tiny"]


@pytest.mark.parametrize("spec", ['tiny:image.block=["sasp"', "tiny:image.depth"])
def test_a_malformed_model_spec_exits_in_one_line_naming_it(spec):
    with pytest.raises(SystemExit) as exit_:
        main(["--models", spec, "--steps", "1"])
    message = str(exit_.value)
    assert message.startswith("bench-fit: model ") and repr(spec) in message and "\n" not in message
