"""Batched caption generation: N nucleus-sampled captions per image, each from its own seed.

The sampling draw of caption j of sample `key` comes from a generator seeded by (seed, key, j), so a
sample gets the same captions whichever batch, worker or rerun it lands in.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from siclip.captioning.models import LoadedModel, load_captioner, load_coca, seed_for, torch_dtype


class SeededNucleusSampler(LogitsProcessor):
    """Temperature, then top-p, then one draw per row from that row's own generator.

    Returns logits that are 0 at the drawn token and -inf elsewhere, so whatever `generate` does next
    (argmax or multinomial) picks exactly the drawn token.
    """

    def __init__(self, seeds: list[int], top_p: float, temperature: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.top_p = top_p
        self.temperature = temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"sampler built for {len(self.generators)} rows got {scores.shape[0]}")
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
        keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < self.top_p
        sorted_p = sorted_p * keep
        cdf = torch.cumsum(sorted_p, dim=-1)
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        u = (u.to(cdf.device, torch.float32) * cdf[:, -1]).unsqueeze(1)
        pick = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
        token = order.gather(1, pick)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token, 0.0)


class HFCaptioner:
    """A transformers image-to-text model (BLIP, GIT, VisionEncoderDecoder, …)."""

    def __init__(self, loaded: LoadedModel, device: str, dtype: str, num_captions: int, top_p: float,
                 temperature: float, max_new_tokens: int, seed: int, prompt: str = ""):
        self.loaded = loaded
        self.device, self.dtype = device, torch_dtype(dtype, device)
        self.n, self.top_p, self.temperature = num_captions, top_p, temperature
        self.max_new_tokens, self.seed, self.prompt = max_new_tokens, seed, prompt
        self.model_id, self.revision = loaded.model_id, loaded.revision

    def prepare(self, images: list) -> torch.Tensor:
        """Images (PIL, RGB) to pixel values; runs on the prefetch thread, off the model's path."""
        return self.loaded.image_processor(images=images, return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def caption(self, pixel_values: torch.Tensor, keys: list[str]) -> list[list[str]]:
        seeds = [seed_for(self.seed, k, j) for k in keys for j in range(self.n)]
        kwargs = {}
        if self.prompt:
            ids = self.loaded.tokenizer(self.prompt, return_tensors="pt")
            kwargs["input_ids"] = ids["input_ids"].repeat(len(keys), 1).to(self.device)
            kwargs["attention_mask"] = ids["attention_mask"].repeat(len(keys), 1).to(self.device)
        out = self.loaded.model.generate(
            pixel_values=pixel_values.to(self.device, self.dtype), do_sample=True, num_beams=1,
            num_return_sequences=self.n, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=self.max_new_tokens,
            min_new_tokens=1,  # an empty synthetic caption teaches nothing
            logits_processor=LogitsProcessorList([SeededNucleusSampler(seeds, self.top_p, self.temperature)]),
            **kwargs)
        texts = [t.strip() for t in self.loaded.tokenizer.batch_decode(out, skip_special_tokens=True)]
        return [texts[i * self.n:(i + 1) * self.n] for i in range(len(keys))]


class CocaCaptioner:
    """open_clip CoCa (the seed's captioner), sampled here rather than by open_clip's `generate` (which draws
    from the global generator, and which open_clip 3.3 disables under transformers 5): every caption of
    every image draws from its own seeded generator, so a whole batch decodes at once and each caption is
    the one it would be alone. The temperature applies before top-p, as for the transformers captioners
    (open_clip's own `generate` applies it after); like open_clip's, no end token before the 4th token."""

    SOT, EOT, MIN_TOKENS = 49406, 49407, 4  # CLIP's start and end tokens; open_clip's min_seq_len 5 counts the start

    def __init__(self, spec: str, device: str, dtype: str, num_captions: int, top_p: float, temperature: float,
                 max_new_tokens: int, seed: int):
        self.model, self.preprocess = load_coca(spec, device, dtype)
        self.device, self.dtype = device, torch_dtype(dtype, device)
        self.n, self.top_p, self.temperature, self.max_new_tokens, self.seed = num_captions, top_p, temperature, max_new_tokens, seed
        self.model_id, self.revision = spec, None

    def prepare(self, images: list) -> torch.Tensor:
        return torch.stack([self.preprocess(im) for im in images])

    @torch.inference_mode()
    def sample(self, pixel_values: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Token ids (start token first) of len(seeds) // len(pixel_values) captions per image, image-major."""
        image = self.model(pixel_values.to(self.device, self.dtype))  # the image tower runs once per image
        per_image = len(seeds) // len(pixel_values)
        latent, embs = (image[k].repeat_interleave(per_image, dim=0) for k in ("image_features", "image_embs"))
        sampler = SeededNucleusSampler(seeds, self.top_p, self.temperature)
        out = torch.full((len(seeds), 1), self.SOT, dtype=torch.long, device=latent.device)
        done = torch.zeros(len(seeds), dtype=torch.bool, device=latent.device)
        for step in range(self.max_new_tokens):
            logits = self.model(None, out, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
            logits = logits.float()
            if step < self.MIN_TOKENS:
                logits[:, self.EOT] = float("-inf")
            token = sampler(out, logits).argmax(dim=-1)  # the sampler leaves 0 at its draw, -inf elsewhere
            token = token.masked_fill(done, self.EOT)
            out = torch.cat([out, token[:, None]], dim=1)
            done |= token == self.EOT
            if done.all():
                break
        return out

    def caption(self, pixel_values: torch.Tensor, keys: list[str]) -> list[list[str]]:
        import open_clip

        ids = self.sample(pixel_values, [seed_for(self.seed, k, j) for k in keys for j in range(self.n)])
        texts = [open_clip.decode(row).split("<end_of_text>")[0].replace("<start_of_text>", "").strip(" .,")
                 for row in ids.cpu()]
        return [texts[i * self.n:(i + 1) * self.n] for i in range(len(keys))]


def build_captioner(params: dict, device: str, dtype: str, trust_remote_code: bool, threads: int = 0):
    """The captioner `params` (CaptionsConfig.generation_params()) name, loaded once per worker."""
    if threads:
        torch.set_num_threads(threads)
    gen = dict(num_captions=params["num_captions"], top_p=params["top_p"], temperature=params["temperature"],
               max_new_tokens=params["max_new_tokens"], seed=params["seed"])
    if params["model"].startswith("coca:"):
        return CocaCaptioner(params["model"], device, dtype, **gen)
    loaded = load_captioner(params["model"], params.get("revision"), device, dtype, params["seed"], trust_remote_code)
    return HFCaptioner(loaded, device, dtype, prompt=params.get("prompt", ""), **gen)
