"""Adapter slots of an encoder: what the ONNX graph and the numpy forward take beside the base.

Both engines compute exactly this (x is [batch, seq, dim]; ``rows`` is 1 — every row alike — or
batch — row b uses slot[b]; every slot has a default that leaves the base unchanged):

Per linear weight W of ``cfg.linear_shapes()`` (GGUF name ``<W>``):
  ``lora.<W>.a``  [rows, in, r]    default [1, in, 0]
  ``lora.<W>.b``  [rows, r, out]   default [1, 0, out]      (scale folded in)
  ``ia3.<W>``     [rows, 1, out]   default ones [1, 1, out]
  y = ((x @ Wᵀ + bias) + (x @ a) @ b) * ia3

Per block i and position p ∈ {attn, ffn} — a bottleneck adapter (AdapterHub's ``Adapter`` /
``ParallelAdapter``) where the sub-layer output h (dense + bias, before the residual) meets the
residual input t and the block's LayerNorm LN (attn_output_norm / layer_output_norm):
  ``bn.<i>.<p>.ctrl``        [rows, 1, 18]  default: r_L = 1, everything else 0 (the bare base)
  ``bn.<i>.<p>.down``        [rows, dim, m] default [1, dim, 0]; ``.down_bias`` [rows, 1, m]
  ``bn.<i>.<p>.up``          [rows, m, dim] default [1, 0, dim]; ``.up_bias`` [rows, 1, dim] zeros
                                            (AdapterHub's scaling and the use() weight folded in)
  ``bn.<i>.<p>.ln_before.weight`` / ``.bias``, ``.ln_after.weight`` / ``.bias`` [rows, 1, dim]
                                            (ones / zeros; the adapter's own LayerNorms, eps 1e-5)

  s = h + t;  L = LN(s)
  x0 = c.x_h·h + c.x_t·t + c.x_L·L                      adapter input
  r  = c.r_h·h + c.r_s·s + c.r_L·L                      adapter residual
  x  = c.ln_before·LNb(x0) + (1 − c.ln_before)·x0
  u  = act(x @ down + down_bias) @ up + up_bias,  act = Σ_k c.act_k · act_k
  pre = u + c.arb·r;  post = c.ln_after·LNa(pre) + (1 − c.ln_after)·pre;  out = post + (1 − c.arb)·r
  block output = c.ln_out·LN(out + t) + (1 − c.ln_out)·out

Every coefficient is 0 or 1, so each line is one of AdapterHub's branches, exactly.
This module imports only numpy: it is used on devices.
"""

from __future__ import annotations

import numpy as np

POSITIONS = ("attn", "ffn")
NORMS = {"attn": "attn_output_norm", "ffn": "layer_output_norm"}
ACTS = ("relu", "silu", "gelu", "gelu_new", "tanh", "sigmoid", "identity", "leakyrelu")
CTRL = ("x_h", "x_t", "x_L", "r_h", "r_s", "r_L", "ln_before", "ln_after", "arb", "ln_out") + tuple(f"act_{a}" for a in ACTS)
C = {k: i for i, k in enumerate(CTRL)}
ADAPTER_LN_EPS = 1e-5
BN_PARTS = ("ctrl", "down", "down_bias", "up", "up_bias", "ln_before.weight", "ln_before.bias",
            "ln_after.weight", "ln_after.bias")


def lora_names(w: str) -> tuple[str, str]:
    return f"lora.{w}.a", f"lora.{w}.b"


def ia3_name(w: str) -> str:
    return f"ia3.{w}"


def bn_name(i: int, p: str, part: str) -> str:
    return f"bn.{i}.{p}.{part}"


def default_ctrl() -> np.ndarray:
    c = np.zeros(len(CTRL), np.float32)
    c[C["r_L"]] = 1.0
    return c


def defaults(cfg) -> dict[str, np.ndarray]:
    """Every slot input and its default value (the bare base)."""
    d, out = cfg.dim, {}
    for w, (n_out, n_in) in cfg.linear_shapes().items():
        a, b = lora_names(w)
        out[a], out[b] = np.zeros((1, n_in, 0), np.float32), np.zeros((1, 0, n_out), np.float32)
        out[ia3_name(w)] = np.ones((1, 1, n_out), np.float32)
    for i in range(cfg.n_layers):
        for p in POSITIONS:
            out.update({bn_name(i, p, part): a for part, a in bn_defaults(d).items()})
    return out


def bn_defaults(dim: int) -> dict[str, np.ndarray]:
    """part -> the idle value of one bottleneck slot (width 0: the bare base)."""
    out = {"ctrl": default_ctrl()[None, None],
           "down": np.zeros((1, dim, 0), np.float32), "down_bias": np.zeros((1, 1, 0), np.float32),
           "up": np.zeros((1, 0, dim), np.float32), "up_bias": np.zeros((1, 1, dim), np.float32)}
    for ln in ("ln_before", "ln_after"):
        out[f"{ln}.weight"] = np.ones((1, 1, dim), np.float32)
        out[f"{ln}.bias"] = np.zeros((1, 1, dim), np.float32)
    return out


def bn_feeds(dim: int, per_position: dict[tuple[int, str], list[dict[str, np.ndarray] | None]]
             ) -> dict[str, np.ndarray]:
    """Slot inputs from {(block, position): per row the adapter's slot arrays (``BottleneckAdapter.slot``)
    or None}: widths zero-padded to the widest row (exact: a padded unit's up row is zero), a row
    without an adapter gets the idle slot."""
    idle, feeds = bn_defaults(dim), {}
    for (i, pos), per_row in per_position.items():
        n = len(per_row)
        m = max(s["down"].shape[1] for s in per_row if s is not None)
        for part in BN_PARTS:
            d = idle[part][0]
            shape = (d.shape[0], m) if part in ("down", "down_bias") else (m, d.shape[1]) if part == "up" else d.shape
            arr = np.zeros((n, *shape), np.float32)
            for r, s in enumerate(per_row):
                v = d if s is None else s[part]
                arr[r, : v.shape[0], : v.shape[1]] = v
            feeds[bn_name(i, pos, part)] = arr
    return feeds


# ---- numpy reference of the slot math (the numpy engine uses it; tests compare the graph with it)
def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(-1, keepdims=True)
    return xc / np.sqrt(var + np.float32(eps)) * w + b


def _erf(x: np.ndarray) -> np.ndarray:
    """erf in float64 (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7), returned as float32."""
    x64 = x.astype(np.float64)
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x64))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (np.sign(x64) * (1.0 - poly * np.exp(-x64 * x64))).astype(np.float32)


def gelu(x: np.ndarray) -> np.ndarray:
    return (0.5 * x * (1.0 + _erf(x / np.float32(np.sqrt(2.0))))).astype(np.float32)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    k = np.float32(np.sqrt(2.0 / np.pi))
    return (0.5 * x * (1.0 + np.tanh(k * (x + np.float32(0.044715) * x * x * x)))).astype(np.float32)


def activation(name: str, x: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(x, 0)
    if name == "silu":
        return x / (1 + np.exp(-x))
    if name == "gelu":
        return gelu(x)
    if name == "gelu_new":
        return gelu_tanh(x)
    if name == "tanh":
        return np.tanh(x)
    if name == "sigmoid":
        return 1 / (1 + np.exp(-x))
    if name == "leakyrelu":
        return np.where(x >= 0, x, np.float32(0.01) * x)
    return x


def bottleneck(h: np.ndarray, t: np.ndarray, ln_w: np.ndarray | None, ln_b: np.ndarray | None, eps: float,
               s: dict[str, np.ndarray]) -> np.ndarray:
    """The slot formula above; ``s`` maps part -> array (``ctrl`` [rows,1,18], ...). ``ln_w`` None: the
    block has no LayerNorm there (a pre-norm decoder: AdapterHub passes ``layer_norm=None``), LN = identity."""
    c = s["ctrl"]
    k = lambda name: c[..., C[name]:C[name] + 1]  # noqa: E731  [rows, 1, 1]
    sm = h + t
    ln = (lambda v: v) if ln_w is None else (lambda v: layer_norm(v, ln_w, ln_b, eps))  # noqa: E731
    L = ln(sm)
    x0 = k("x_h") * h + k("x_t") * t + k("x_L") * L
    r = k("r_h") * h + k("r_s") * sm + k("r_L") * L
    x = k("ln_before") * layer_norm(x0, s["ln_before.weight"], s["ln_before.bias"], ADAPTER_LN_EPS) \
        + (1 - k("ln_before")) * x0
    z = x @ s["down"] + s["down_bias"]
    a = sum(k(f"act_{n}") * activation(n, z) for n in ACTS if k(f"act_{n}").any()) if z.size else z
    u = a @ s["up"] + s["up_bias"]
    pre = u + k("arb") * r
    post = k("ln_after") * layer_norm(pre, s["ln_after.weight"], s["ln_after.bias"], ADAPTER_LN_EPS) \
        + (1 - k("ln_after")) * pre
    out = post + (1 - k("arb")) * r
    return k("ln_out") * ln(out + t) + (1 - k("ln_out")) * out
