"""`make demo`'s parts, outside the installed package (docs/design.md): the generated scenes, the loopback
server that plays the web, the driver that downloads them into a data root (`python -m demo`) and the tiny
captioner's fitting (`python -m demo.fit`). They run from a source checkout; nothing installed imports them."""
