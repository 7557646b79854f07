"""Differential fuzzing of ``block_sparse_attention`` (forward and backward with the forward through
the C++ kernel), ``PatternAttention`` and ``PatternLinear`` against float64 references."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fuzzlib import Tally, case_count, inject_nonfinite, layout, rng_for, same_values
from torch import nn

import autosculpt as asc
from autosculpt.attention_patterns import PATTERN_TYPES
from autosculpt.nn import PatternAttention
from autosculpt.nn.linear import PatternLinear
from autosculpt.ops import block_sparse_attention
from autosculpt.reference import block_sparse_attention_ref

HAS_CPU = asc.runtime.available_backends()["cpu"]
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _draw_attention(rng):
    b = rng.choice([0, 1, 1, 2, 3])
    h = rng.randint(1, 4)
    lq, lk = rng.randint(1, 100), rng.randint(1, 100)
    if rng.random() < 0.5:
        lk = lq
    d = rng.choice([1, 3, 8, 16, 31, 32, 64, 80])
    bs = rng.choice([16, 32, 64, 128, 1, 7, 24, 50, 97, 129, 300, 10**6])
    nq, nk = -(-lq // bs), -(-lk // bs)
    density = rng.choice([0.0, 0.3, 0.7, 1.0, rng.random()])
    mask = torch.rand(h, nq, nk) < density
    scale = rng.choice([None, 0.1, 1.0, 3.0])
    return b, h, lq, lk, d, bs, mask, scale


def _strided(rng, t):
    """(B, H, L, D) values, possibly as a transposed (B, L, H, D) view or another layout."""
    kind = rng.choice(["contiguous", "strided", "transposed"])
    if kind == "transposed":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return layout(t, kind)


@pytest.mark.skipif(not HAS_CPU, reason="C++ extension not built")
def test_fuzz_block_sparse_attention():
    """The C++ kernel and the torch backend: fwd on NaN/Inf, strided and half inputs; bwd on finite."""
    fuzz_attention(Tally("block_sparse_attention"), ("cpu", "torch"), case_count(150)).check()


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_fuzz_block_sparse_attention_triton():
    """The Triton kernel under its interpreter, in a child process that sets TRITON_INTERPRET=1 before
    triton is imported (an interpreter entered later fails on its own helpers)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import json, test_fuzz_attention as T, fuzzlib; "
            "t = T.fuzz_attention(fuzzlib.Tally('block_sparse_attention[triton]'), ('triton',), int(sys.argv[2])); "
            "t.check()")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(max(10, case_count(150) // 4))],
                          env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def fuzz_attention(tally: Tally, backend_names, cases: int) -> Tally:
    """Runs ``cases`` attention cases on ``backend_names`` (Triton only where it applies: fp32, block
    sizes 16-64, small shapes) and returns the tally."""
    for case in range(cases):
        rng = rng_for(tally.name, case)
        b, h, lq, lk, d, bs, mask, scale = _draw_attention(rng)
        dtype = rng.choice([torch.float32, torch.float32, torch.float32, torch.bfloat16, torch.float16])
        q, k, v = torch.randn(b, h, lq, d), torch.randn(b, h, lk, d), torch.randn(b, h, lk, d)
        nonfinite = rng.random() < 0.2
        if nonfinite:
            for t in rng.sample([q, k, v], rng.randint(1, 2)):
                inject_nonfinite(rng, t, rng.randint(1, 2))
        q, k, v = (_strided(rng, t.to(dtype)) for t in (q, k, v))
        ref = block_sparse_attention_ref(q.double(), k.double(), v.double(), mask, bs, scale)
        tol = 2e-5 if dtype == torch.float32 else 1e-2
        bound = torch.tensor(tol * (1 + float(v.double().abs().nan_to_num(0, 0, 0).max().clamp_min(0) if v.numel() else 0)))
        triton_ok = dtype == torch.float32 and bs in (16, 32, 64) and b * h * lq <= 400
        backends = [n for n in backend_names if n != "triton" or triton_ok]
        if not backends:
            continue
        tally.cases += 1
        for backend in backends:
            desc = f"case {case} backend={backend} B={b} H={h} Lq={lq} Lk={lk} D={d} bs={bs} {dtype} nonfinite={nonfinite}"
            try:
                out = block_sparse_attention(q, k, v, mask, bs, scale, backend)
            except Exception as exc:  # noqa: BLE001 - a crash on valid input is a finding
                tally.crashes.append(f"{desc}: {type(exc).__name__}: {exc}")
                continue
            tally.compared += 1
            # An infinite value row meets probabilities that underflow to 0 at different points in fp32
            # and fp64 (0 * inf = NaN vs tiny * inf = inf): NaN and inf count as one class here.
            problem = same_values(out, ref.to(dtype), bound, nonfinite_as_one=nonfinite)
            if problem:
                tally.mismatches.append(f"{desc}: {problem}")
        if "cpu" in backends and not nonfinite and b > 0 and dtype == torch.float32 and rng.random() < 0.5:
            _check_backward(tally, case, q, k, v, mask, bs, scale)
    return tally


def _check_backward(tally, case, q, k, v, mask, bs, scale):
    """Gradients through the op with its forward in the C++ kernel, against autograd of the reference."""
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    try:
        out = block_sparse_attention(qs, ks, vs, mask, bs, scale, "cpu")
        g = torch.randn_like(out)
        out.backward(g)
    except Exception as exc:  # noqa: BLE001
        tally.crashes.append(f"case {case} backward: {type(exc).__name__}: {exc}")
        return
    block_sparse_attention_ref(qd, kd, vd, mask, bs, scale).backward(g.double())
    tally.compared += 1
    for name, got, want in (("dq", qs.grad, qd.grad), ("dk", ks.grad, kd.grad), ("dv", vs.grad, vd.grad)):
        bound = torch.tensor(1e-4 * (1 + float(want.abs().max())))
        problem = same_values(got, want, bound)
        if problem:
            tally.mismatches.append(f"case {case} backward {name} bs={bs} shape={tuple(q.shape)}: {problem}")


def _random_spec(rng):
    kind = rng.choice(PATTERN_TYPES)
    spec = {"type": kind}
    if kind in ("local", "strided", "global_local"):
        spec["window"] = rng.randint(0, 2)
    if kind == "strided":
        spec["stride"] = rng.randint(1, 3)
    if kind == "global_local":
        spec["num_global"] = rng.randint(1, 2)
    return spec


@pytest.mark.skipif(not HAS_CPU, reason="C++ extension not built")
def test_fuzz_pattern_attention():
    """``PatternAttention.from_dense`` of an ``nn.MultiheadAttention`` against SDPA with the same
    per-head token masks (pruned heads contribute nothing), batched and unbatched, fwd + bwd."""
    tally = Tally("PatternAttention")
    for case in range(case_count(60)):
        rng = rng_for(tally.name, case)
        heads = rng.randint(1, 4)
        embed = heads * rng.choice([4, 8, 16])
        mha = nn.MultiheadAttention(embed, heads, batch_first=True)
        specs = [_random_spec(rng) for _ in range(heads)]
        bs = rng.choice([4, 8, 16, 32])
        path = rng.choice(["sparse", "dense", "auto"])
        layer = PatternAttention.from_dense(mha, specs, block_size=bs, path=path)
        b, length = rng.choice([0, 1, 2, 3]), rng.randint(1, 70)
        x = torch.randn(b, length, embed)
        unbatched = b == 1 and rng.random() < 0.3
        tally.cases += 1
        desc = f"case {case} heads={heads} E={embed} bs={bs} L={length} B={b} path={path} specs={specs}"
        try:
            xs = x[0].clone().requires_grad_() if unbatched else x.clone().requires_grad_()
            out = layer(xs)
            out = out[0] if isinstance(out, tuple) else out
            ref = _attention_reference(mha, layer, x.double(), length)
            ref = ref[0] if unbatched else ref
            tally.compared += 1
            problem = same_values(out.detach(), ref, torch.tensor(1e-4 * (1 + float(ref.abs().max()) if ref.numel() else 1)))
            if problem:
                tally.mismatches.append(f"{desc}: {problem}")
            if out.numel():
                out.sum().backward()
                if xs.grad is None:  # only when every head is pruned: the output is the bias alone
                    if not all(p["type"] == "empty" for p in specs):
                        tally.mismatches.append(f"{desc}: no input gradient")
                elif not torch.isfinite(xs.grad).all():
                    tally.mismatches.append(f"{desc}: non-finite input gradient")
        except Exception as exc:  # noqa: BLE001
            tally.crashes.append(f"{desc}: {type(exc).__name__}: {exc}")
    tally.check()


def _attention_reference(mha, layer, x, length):
    """The dense module's attention, in float64, with each head's token mask (empty heads output 0)."""
    e, heads = mha.embed_dim, mha.num_heads
    hd = e // heads
    w, bias = mha.in_proj_weight.double(), mha.in_proj_bias.double()
    qkv = F.linear(x, w, bias).reshape(x.shape[0], length, 3, heads, hd).permute(2, 0, 3, 1, 4)
    tok = layer.token_attn_mask(length).cpu()
    scores = (qkv[0] @ qkv[1].transpose(-1, -2)) * hd ** -0.5
    scores = scores.masked_fill(~tok, float("-inf"))
    empty = ~tok.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    pruned = torch.tensor([p["type"] == "empty" for p in layer.head_patterns])
    o = (probs @ qkv[2]).masked_fill(pruned[None, :, None, None], 0.0)  # a pruned head contributes nothing
    o = o.transpose(1, 2).reshape(x.shape[0], length, e)
    return F.linear(o, mha.out_proj.weight.double(), mha.out_proj.bias.double())


def test_fuzz_pattern_linear():
    """``PatternLinear.from_dense`` (kept output/input blocks, compact or scattered) against the dense
    layer with the pruned rows and columns zeroed, forward and backward."""
    tally = Tally("PatternLinear")
    for case in range(case_count(100)):
        rng = rng_for(tally.name, case)
        fin, fout = rng.randint(1, 70), rng.randint(1, 70)
        lin = nn.Linear(fin, fout, bias=rng.random() < 0.7)
        bs = rng.choice([1, 4, 16, 32, 100])
        nbo, nbi = -(-fout // bs), -(-fin // bs)
        out_blocks = None if rng.random() < 0.3 else rng.sample(range(nbo), rng.randint(0, nbo))
        in_blocks = None if rng.random() < 0.3 else rng.sample(range(nbi), rng.randint(0, nbi))
        compact_out = rng.random() < 0.3
        layer = PatternLinear.from_dense(lin, out_blocks, in_blocks, bs, compact_output=compact_out)
        shape = rng.choice([(0,), (1,), (3,), (2, 5), ()])
        x = torch.randn(*shape, fin)
        if rng.random() < 0.15:
            inject_nonfinite(rng, x, 1)
        x = layout(x, rng.choice(["contiguous", "strided"]))
        tally.cases += 1
        desc = f"case {case} in={fin} out={fout} bs={bs} out_blocks={out_blocks} in_blocks={in_blocks} shape={shape}"
        try:
            xs = x.clone().requires_grad_()
            out = layer(xs)
            w = lin.weight.detach().double().clone()
            keep_in = torch.zeros(fin, dtype=torch.bool)
            keep_in[layer.in_index] = True
            keep_out = torch.zeros(fout, dtype=torch.bool)
            keep_out[layer.out_index] = True
            w[:, ~keep_in] = 0
            w[~keep_out] = 0
            b = None if lin.bias is None else lin.bias.detach().double() * keep_out
            # pruned inputs are never read: a NaN there must not leak (reference reads kept columns only)
            ref = F.linear(x.double()[..., keep_in], w[:, keep_in], b)
            ref[..., ~keep_out] = 0.0  # pruned output units are exactly zero (never computed)
            if compact_out:
                ref = ref[..., layer.out_index]
            tally.compared += 1
            problem = same_values(out.detach(), ref, torch.tensor(1e-5 * (1 + fin)))
            if problem:
                tally.mismatches.append(f"{desc}: {problem}")
            if out.numel() and torch.isfinite(x).all():
                out.sum().backward()
                want = (torch.ones_like(ref) @ (w[layer.out_index][:, keep_in] if compact_out else w[:, keep_in]))
                got = xs.grad[..., keep_in].double()
                if same_values(got, want, torch.tensor(1e-4 * (1 + fout))) or bool((xs.grad[..., ~keep_in] != 0).any()):
                    tally.mismatches.append(f"{desc}: input gradient differs")
        except Exception as exc:  # noqa: BLE001
            tally.crashes.append(f"{desc}: {type(exc).__name__}: {exc}")
    tally.check()


if os.environ.get("AUTOSCULPT_FUZZ_CASES"):
    pytestmark = pytest.mark.slow
