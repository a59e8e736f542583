"""Stage 3: the SiCLIP model, its losses, weight inheritance, the data loader and the training loop.

`training.load(run_or_checkpoint)` returns (model, tokenizer, preprocess) of a trained model.
"""


def load(path, device: str = "cpu"):
    """(model, tokenizer, preprocess) of a run or checkpoint folder; see training.evaluate.load."""
    from siclip.training.evaluate import load as _load

    return _load(path, device)
