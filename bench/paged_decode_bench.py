"""One layer's decode attention at a variant's real shapes: the paged kernel (model/paged_attention.py, reads
each sequence's blocks in place to its own length) against what the engine does without it (gather the
blocks into a padded copy, then `core`: SDPA for MHA, the MQA matmuls for MLA).

    python bench/paged_decode_bench.py --device cuda --variants tiny small base --batch 64 256

Sequences of the page workload's cached lengths (uniform in 1,450-2,150 tokens: a 1,450-token prompt
through its 700 new tokens), scattered blocks of 64 tokens (CUDA). Prints one JSON line: per variant and
batch, median ms of each way, the bytes the cache read takes (each sequence's real tokens once) as GB/s
at each way's time, and the largest difference between the two outputs. On CPU the kernel runs in Triton's
interpreter (set TRITON_INTERPRET=1; `--size mini`): a rehearsal of the script, not a timing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model.config import LanguageConfig  # noqa: E402
from model.kv_cache import PagedKVCache  # noqa: E402
from model.language import MHAttention, MLAttention  # noqa: E402
from model.paged_attention import interpreted  # noqa: E402
from model.presets import make_config  # noqa: E402
from model.runner import _additive, length_mask  # noqa: E402
from moe_fold import _time  # noqa: E402  (median ms; CUDA events on CUDA)


def measure(variant: str, size: str, batches: list[int], device: str, dtype: torch.dtype, repeats: int,
            lengths_range: tuple[int, int], block_size: int) -> dict:
    cfg = LanguageConfig.model_validate(make_config(variant, size)["language_config"])
    torch.manual_seed(0)
    attn = (MLAttention(cfg) if cfg.use_mla else MHAttention(cfg)).to(device, dtype)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.02)
    dev = torch.device(device)
    out: dict = {"mla": bool(cfg.use_mla), "heads": cfg.num_attention_heads}
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        lengths = torch.randint(lengths_range[0], lengths_range[1] + 1, (batch,), generator=gen).tolist()
        width = math.ceil(max(lengths) / block_size)
        blocks = batch * width + 1
        cache = PagedKVCache([attn.entry_shapes()], blocks, block_size, dev, dtype)
        for c in cache.layers[0]:
            c.normal_()
        tables = torch.randperm(blocks, generator=gen)[: batch * width].view(batch, width).to(dev)
        x = torch.randn(1, batch, cfg.hidden_size, device=dev, dtype=dtype)
        q = attn.project(x, torch.tensor([lengths], device=dev) - 1)[0][0].transpose(0, 1).contiguous()  # [B, H, d]
        lens = torch.tensor(lengths, device=dev)
        mask = _additive(length_mask(lengths, width * block_size, dev), dtype)

        def paged():
            return attn.core_paged(q, cache.layers[0], tables, lens, block_size)

        def gathered():
            k, v = attn.kv_from_tokens(cache.gather(0, tables))
            return attn.core(q[:, :, None], k, v, mask=mask)[:, 0]

        with torch.inference_mode():
            want = gathered().float()
            diff = float((paged().float() - want).abs().max())
            paged_ms = _time(paged, device, repeats)
            gathered_ms = _time(gathered, device, repeats)
        read = sum(lengths) * cache.layers[0][0].element_size() * sum(
            math.prod(c.shape) // c.shape[-2] for c in cache.layers[0])  # bytes per token x real tokens
        out[str(batch)] = {
            "tokens": sum(lengths), "kv_read_mb": round(read / 1e6, 2), "max_abs_diff": diff,
            "ref_max_abs": float(want.abs().max()), "paged_ms": round(paged_ms, 4), "gathered_ms": round(gathered_ms, 4),
            "paged_gb_per_s": round(read / paged_ms / 1e6, 1), "gathered_gb_per_s": round(read / gathered_ms / 1e6, 1)}
    return out


def layout(variant: str, size: str) -> dict:
    """The kernel's layout for a variant: heads, kv heads, query/value widths and the rope part."""
    cfg = LanguageConfig.model_validate(make_config(variant, size)["language_config"])
    heads = cfg.num_attention_heads
    if cfg.use_mla:
        return dict(heads=heads, kv_heads=1, dim=cfg.kv_lora_rank, dv=cfg.kv_lora_rank, rope=cfg.qk_rope_head_dim,
                    value_is_key=True)
    d = cfg.hidden_size // heads
    return dict(heads=heads, kv_heads=cfg.num_key_value_heads, dim=d, dv=d, rope=0, value_is_key=False)


def compile_only(arch: int, variants: list[str], block_size: int = 64) -> dict:
    """Compile the kernel for `arch` (e.g. 90: Hopper) without a GPU, at each variant's real layout in bf16
    (and float32), and report ptxas's registers and spills: what can be known of it before a device is lent."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from model.paged_attention import _kernel, launch_config

    fn = JITFunction(_kernel)
    pointers = ["Q", "QR", "K", "KR", "V", "Tables", "Lengths", "Out", "Lse"]
    ptxas = get_ptxas(arch)
    ptxas = getattr(ptxas, "path", ptxas)
    out: dict = {"arch": arch, "triton": triton.__version__}
    for variant in variants:
        for dtype in (torch.bfloat16, torch.float32):
            lay = layout(variant, "full")
            const, warps = launch_config(lay["heads"], lay["kv_heads"], lay["dim"], lay["dv"], lay["rope"],
                                         block_size, dtype, lay["value_is_key"])
            elem = "bf16" if dtype == torch.bfloat16 else "fp32"
            sig = {}
            for name in fn.arg_names:
                if name in const:
                    sig[name] = "constexpr"
                elif name in pointers:
                    sig[name] = {"Tables": "*i64", "Lengths": "*i64", "Out": "*fp32", "Lse": "*fp32"}.get(name, f"*{elem}")
                else:
                    sig[name] = {"scale": "fp32", "tokens_per_split": "i32"}.get(name, "i64")
            src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                f.write(kernel.asm["ptx"])
                f.flush()
                info = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                                      capture_output=True, text=True, check=True).stderr
            regs = re.search(r"Used (\d+) registers", info)
            spills = re.search(r"(\d+) bytes spill stores", info)
            out[f"{variant}_{elem}"] = {"registers": int(regs.group(1)) if regs else None,
                                        "spill_store_bytes": int(spills.group(1)) if spills else None,
                                        "shared_bytes": kernel.metadata.shared, "num_warps": warps,
                                        "block_n": const["BLOCK_N"]}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=["mini", "full"], default="full")
    ap.add_argument("--variants", nargs="*", default=["tiny", "small", "base"])
    ap.add_argument("--batch", type=int, nargs="*", default=[64, 256])
    ap.add_argument("--lengths", type=int, nargs=2, default=None, help="cached tokens, uniform in [a, b]")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--compile-only", type=int, default=None, metavar="ARCH",
                    help="no device: compile for sm_ARCH (90: Hopper) and print registers and spills (TRITON_INTERPRET "
                         "must be off)")
    args = ap.parse_args(argv)
    if args.compile_only:
        result = compile_only(args.compile_only, args.variants)
        print(json.dumps(result), flush=True)
        return result
    cuda = args.device.startswith("cuda")
    if not cuda and not interpreted():
        raise RuntimeError("on CPU the kernel runs only in Triton's interpreter: set TRITON_INTERPRET=1")
    dtype = torch.bfloat16 if cuda else torch.float32
    lengths = tuple(args.lengths) if args.lengths else ((1450, 2150) if args.size == "full" else (40, 90))
    block_size = 64 if cuda else 16
    result = {"device": args.device, "device_name": torch.cuda.get_device_name() if cuda else "cpu",
              "dtype": str(dtype).split(".")[1], "torch": torch.__version__, "size": args.size,
              "block_size": block_size, "lengths": list(lengths)}
    for v in args.variants:
        try:
            result[v] = measure(v, args.size, args.batch, args.device, dtype, args.repeats, lengths, block_size)
        except Exception as e:  # noqa: BLE001 - a kernel that fails to compile is a finding: record, go on
            result[v] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
