"""Compile the kernels ahead of time for a GPU target, on any machine (no GPU needed, nothing is launched).

The Triton interpreter accepts programs the GPU compiler rejects (and vice versa), so CPU-only CI checks that every
kernel still lowers to a cubin with the ``ptxas`` shipped in the Triton wheel, and reports registers and spills::

    python -m spectralkv.kernels.aot --arch 90 --head-dims 64 128

Must run without ``TRITON_INTERPRET=1`` (under the interpreter ``@triton.jit`` gives functions that cannot be
compiled); :func:`main` refuses otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Compiled:
    name: str
    shared: int  # bytes of shared memory
    registers: int | None  # per thread, from cuobjdump (None when unavailable)
    spills: int | None  # local memory bytes per thread


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(part.split(":", 1) for line in out.splitlines() if "REG:" in line for part in line.split())
    return (int(fields["REG"]) if "REG" in fields else None, int(fields["LOCAL"]) if "LOCAL" in fields else None)


def _compile(fn: Any, types: dict[str, str], consts: dict[str, Any], arch: int, num_warps: int) -> Any:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature, constexprs = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            signature[n] = "constexpr"
            constexprs[(i,)] = consts[n]
        else:
            signature[n] = types.get(n, "*i32" if n.endswith("_ptr") else "i32")
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def compile_all(arch: int = 90, head_dims: tuple[int, ...] = (64, 128), group: int = 4, num_warps: int = 4,
                dtype: str = "bf16") -> list[Compiled]:
    """Compile every kernel variant the library launches for ``head_dims`` (raises on the first failure)."""
    from . import decode_attention as da
    from . import encode as en

    results = []

    def run(label: str, fn: Any, types: dict[str, str], consts: dict[str, Any]) -> None:
        k = _compile(fn, types, consts, arch, num_warps)
        regs, spills = _resource_usage(k.asm["cubin"])
        results.append(Compiled(label, k.metadata.shared, regs, spills))

    block_g = max(16, 1 << (group - 1).bit_length())
    for d in head_dims:
        block_d = max(16, 1 << (d - 1).bit_length())
        outlier_types = {f"{side}o_{n}_ptr": t for side in "kv"
                         for n, t in (("cnt", "*u8"), ("st", "*i32"), ("idx", "*i16"), ("val", "*fp16"))}
        variants = [(u, "table", False, False, False, False) for u in da.UNPACK_MODES] + [
            ("gather", "select", False, False, False, False), ("gather", "table", True, False, False, False),
            ("gather", "table", False, True, False, False), ("gather", "table", True, False, True, False),
            ("gather", "table", True, False, True, True)]
        for unpack, lookup, outliers, lengths, positions, log8 in variants:
            label = (f"stage1 d={d} {unpack} {lookup}{' outliers' if outliers else ''}{' lengths' if lengths else ''}"
                     f"{' positions' if positions else ''}{' log8' if log8 else ''}")
            scale_type = "*u8" if log8 else "*fp16"
            run(label, da._stage1_kernel,
                {"qx_ptr": "*fp32", "q_ptr": f"*{dtype}", "kc_ptr": "*u8", "vc_ptr": "*u8", "ks_ptr": scale_type,
                 "vs_ptr": scale_type, "ksl_ptr": "*fp32", "vsl_ptr": "*fp32", "k_tab_ptr": "*fp32",
                 "v_tab_ptr": "*fp32", "cm_ptr": "*u8", "fm_ptr": "*u8",
                 "kf_ptr": f"*{dtype}", "vf_ptr": f"*{dtype}", "acc_ptr": "*fp32", "m_ptr": "*fp32",
                 "l_ptr": "*fp32", "qk_scale": "fp32", "qp_ptr": "*fp32", "kp_ptr": "*i64",
                 "freq_ptr": "*fp64"} | outlier_types,
                dict(G=group, HEAD_DIM=d, K_POS=positions, K_SCALE=True, V_SCALE=True, K_SCALE_LOG8=log8,
                     V_SCALE_LOG8=log8, K_OUT=outliers, V_OUT=outliers,
                     HAS_COMP_MASK=True, HAS_FP_MASK=True, HAS_LENGTHS=lengths, UNPACK=unpack, LOOKUP=lookup,
                     TABLE_STRIDE=256, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_F=max(16, block_d // 2), BLOCK_T=32,
                     BLOCK_HB_K=block_d // 2, BLOCK_HB_V=block_d // 2))
        run(f"stage2 d={d}", da._stage2_kernel,
            {n: "*fp32" for n in ("acc_ptr", "m_ptr", "l_ptr", "qx_ptr", "dec_ptr", "vmean_ptr")}
            | {"out_ptr": f"*{dtype}", "qk_scale": "fp32"},
            dict(G=group, HEAD_DIM=d, HAS_WINDOW=True, BLOCK_G=block_g, BLOCK_D=block_d))
        for log8 in (False, True):
            run(f"encode d={d}{' log8' if log8 else ''}", en._encode_kernel,
                {"x_ptr": f"*{dtype}", "mean_ptr": "*fp32", "enc_ptr": "*fp32", "bnd_ptr": "*fp32", "out_ptr": "*u8",
                 "scale_ptr": "*u8" if log8 else "*fp16", "stab_ptr": "*fp32", "z_ptr": "*fp32"},
                dict(HEAD_DIM=d, ROTATE=True, SCALE_MODE=en.SCALE_COMPUTE, SCALE_LOG8=log8, WRITE_Z=True,
                     SCALE_MIN=1e-6, TABLE_STRIDE=256, BLOCK_T=16, BLOCK_D=block_d, BLOCK_HB=block_d // 2))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = H100)")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--group", type=int, default=4, help="query heads per KV head")
    p.add_argument("--num-warps", type=int, default=4)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    for c in compile_all(args.arch, tuple(args.head_dims), args.group, args.num_warps):
        print(f"{c.name:24s} shared={c.shared:6d} B  registers={c.registers}  spills={c.spills} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
