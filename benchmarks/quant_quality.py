"""Perplexity and mean KL divergence of W8A16 / W8A8 quantized models against their float original.

The checkpoint is loaded at --param-dtype (default bfloat16: "the bf16 original") and quantized
by `gemma_jax.quant.quantize_params` three ways: w8a16 (weight-only), w8a8 (plain per-token x
per-channel) and w8a8+smooth (SmoothQuant calibrated on --calibration, a different text from
--text). All score the same token windows of --text, cut the way llama.cpp's `llama-perplexity`
(and `gemma_jax.perplexity`) cut them: chunks of --ctx tokens with BOS first, scoring the
second half of each chunk. Per scored token it compares the float and the quantized
next-token distributions on device:

  * perplexity (and its increase over float, in %), llama.cpp's +/- error estimate;
  * mean KL(float || quantized) in nats, llama.cpp's `--kl-divergence` figure;
  * top-1 agreement: how often both pick the same most likely token.

Targets (issue 6): perplexity increase <= 1% for W8A16, <= 2% for W8A8. Example (the real Gemma 3
270M, ~2000 scored tokens of the GPL):

    python benchmarks/quant_quality.py --ckpt gemma3-270m --text /usr/share/common-licenses/GPL-3
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.checkpoint.resolve import open_checkpoint
from gemma_jax.models.gemma import GemmaConfig
from gemma_jax.models.gemma.model import Transformer
from gemma_jax.perplexity import windows
from gemma_jax.quant import SMOOTH_ALPHA, quantize_params, tree_bytes

@functools.partial(jax.jit, static_argnames=("config", "dtype", "scored", "modes"))
def score(float_params, variants: dict, tokens, *, config: GemmaConfig, dtype, scored: int, modes: tuple) -> dict:
    """Per-token statistics [B, scored] of the last `scored` predictions in each row of tokens [B T].

    `variants` maps a name to an int8 tree; `modes` is ((name, quant), ...) for them.
    """
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    segments = jnp.ones_like(tokens)
    targets = tokens[:, -scored:]

    def logprobs(params, quant):
        logits = Transformer(config, dtype, quant=quant).apply({"params": params}, tokens, positions, segments)[0]
        return jax.nn.log_softmax(logits[:, -scored - 1 : -1].astype(jnp.float32), axis=-1)  # [B scored V]

    base = logprobs(float_params, None)
    out = {"float/nll": -jnp.take_along_axis(base, targets[..., None], -1)[..., 0]}
    for name, quant in modes:
        q = logprobs(variants[name], quant)
        out[f"{name}/nll"] = -jnp.take_along_axis(q, targets[..., None], -1)[..., 0]
        out[f"{name}/kl"] = jnp.sum(jnp.exp(base) * (base - q), axis=-1)
        out[f"{name}/top1"] = (jnp.argmax(q, -1) == jnp.argmax(base, -1)).astype(jnp.float32)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="gemma3-270m", help="HF directory, GGUF file, 'gemma3-270m' or 'tiny'")
    p.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    p.add_argument("--max-tokens", type=int, default=4096, help="use the first N tokens of the text (ctx 512: 2040 scored)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--calibration", default="/usr/share/common-licenses/Apache-2.0", help="SmoothQuant text (not --text)")
    p.add_argument("--calibration-rows", type=int, default=2, help="rows of --ctx tokens of it")
    p.add_argument("--alpha", type=float, default=SMOOTH_ALPHA, help="SmoothQuant migration strength")
    p.add_argument("--param-dtype", default="bfloat16", help="the float original's parameter dtype")
    p.add_argument("--dtype", default=None, help="activation dtype (default float32 on CPU, else bfloat16)")
    args = p.parse_args()
    dtype = jnp.dtype(args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))

    config, params, tokenizer = open_checkpoint(args.ckpt, dtype=args.param_dtype)
    params = jax.tree.map(jnp.asarray, params)
    encode = lambda file: tokenizer.encode(Path(file).read_text(), add_bos=True)
    calibration = np.asarray(encode(args.calibration)[: args.calibration_rows * args.ctx]).reshape(-1, args.ctx)
    start = time.perf_counter()
    variants = {"w8a16": quantize_params(config, params, "w8a16")}
    variants["w8a8"] = variants["w8a16"]  # the same int8 tree, run with int8 activations
    variants["w8a8+smooth"] = quantize_params(config, params, "w8a8", calibration=calibration, alpha=args.alpha)
    size, qsize = tree_bytes(params), tree_bytes(variants["w8a16"])
    print(f"quantized in {time.perf_counter() - start:.1f} s; float {size / 1e6:.1f} MB, int8 {qsize / 1e6:.1f} MB "
          f"({qsize / size:.1%}, embedding int8 per row); SmoothQuant alpha {args.alpha} calibrated on "
          f"{calibration.size} tokens of {args.calibration}")  # fmt: skip
    modes = (("w8a16", "w8a16"), ("w8a8", "w8a8"), ("w8a8+smooth", "w8a8"))

    ids = encode(args.text)[: args.max_tokens]
    chunks, scored = windows(ids, args.ctx, None, tokenizer.bos_id)
    stats: dict[str, list[np.ndarray]] = {}
    start = time.perf_counter()
    for chunk in chunks:
        out = score(params, variants, jnp.asarray(chunk[None]), config=config, dtype=dtype, scored=scored, modes=modes)
        for k, v in out.items():
            stats.setdefault(k, []).append(np.asarray(v, np.float64).ravel())
    values = {k: np.concatenate(v) for k, v in stats.items()}
    n = len(values["float/nll"])
    print(f"{args.ckpt}: {n} tokens scored ({len(chunks)} chunks of {args.ctx}, second halves) of {args.text}; params "
          f"{args.param_dtype}, activations {dtype.name}, {jax.default_backend()}, {time.perf_counter() - start:.0f} s\n")

    ppl = lambda nll: math.exp(nll.mean())
    err = lambda nll: ppl(nll) * nll.std() / math.sqrt(n - 1)
    base = ppl(values["float/nll"])
    print("| model | perplexity | vs float | mean KL (nats) | top-1 agree |")
    print("|---|---|---|---|---|")
    print(f"| float ({args.param_dtype}) | {base:.4f} ± {err(values['float/nll']):.4f} | | | |")
    for name, _ in modes:
        nll = values[f"{name}/nll"]
        kl, top1 = values[f"{name}/kl"], values[f"{name}/top1"]
        print(f"| {name} | {ppl(nll):.4f} ± {err(nll):.4f} | {(ppl(nll) / base - 1) * 100:+.3f}% | "
              f"{kl.mean():.5f} | {top1.mean():.2%} |")  # fmt: skip


if __name__ == "__main__":
    main()
