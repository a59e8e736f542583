"""siclip's benchmarks, outside the installed package (docs/design.md): one entry, `python -m bench NAME`
(bench/__main__.py lists them), run from a source checkout's root; nothing installed imports them."""
