"""int8 weights for inference: `QuantLinear`, `QuantEmbedding`, `quantize_model`, `Int8Matmul`.

Design decisions
- int8 weights, symmetric, one scale per output channel (row of the (out, in) weight):
  w[o, i] ~= scale[o] * q[o, i], q = round(w / scale) in [-127, 127], scale = max_i |w[o, i]| / 127 (the
  absmax rule of Dettmers et al. 2022, LLM.int8(), per row; as in PyTorch's and torchao's int8 schemes).
  A decode step at small batch is bound by reading the weights, so 1 byte per weight instead of 4 is the
  point. Every element's error is at most scale / 2 (tested against a float64 reference).
- Each scale is rounded *up* to a bfloat16 value before quantizing: the bf16 kernel takes its scales in
  the activation dtype, and a bf16-exact scale makes the bf16 and fp32 scale the same number (no extra
  rounding), at the cost of steps at most one bf16 ulp (2^-7) coarser.
- Two kernels over the same stored rows, picked per process (`int8_kernel_name`), chosen by measurement
  (bench/bench_int8_kernels.py, bench/results/quant.md):
  - "fbgemm", on x86 CPUs with AVX512-VNNI whose PyTorch quantized engine is fbgemm's (x86/fbgemm):
    `quantized::linear_dynamic` over weights packed once by `quantized::linear_prepack` (what torch.ao
    dynamic quantization runs). It quantizes the activations to uint8 at run time (asymmetric, one
    scale for its whole input) and multiplies int8 x uint8 into int32 with VNNI. One scale per input
    would let one row's range coarsen another's (batch rows, prefill positions), so each row is first
    divided by its max |x| and its output multiplied back: activations are in effect quantized per
    row (per token), as in LLM.int8()'s vector-wise scheme. Full 8-bit range (`reduce_range` off):
    7 bits, torch.ao's default for CPUs whose u8 x s8 pair sums saturate int16 (no VNNI), measured
    +2.8% bits per byte. On SmolLM2-135M's shapes, 1 thread, batch 1, it ran 1.7-4.8x faster than
    the fp32 matmul it replaces and 1.5-3.6x faster than "int8pack" (the 49152 x 576 head: 1.4 ms vs
    6.6 fp32, 4.9 int8pack); at batch 8 2.5-13x and 2.4-5.5x. Cost: the packed weights are a second int8 copy, and torch 2.13
    warns that the quantized tensor dtypes it goes through are deprecated (the warning is silenced
    where the weights are packed; should they go, this path goes with them and "int8pack" remains).
  - "int8pack", everywhere else (ARM's qnnpack, x86 without VNNI, GPUs): weight-only,
    `aten._weight_int8pack_mm` with activations cast to bfloat16 around it (with fp32 activations it
    runs a scalar loop, 8-30x slower than fp32), so it rounds each projection's input and output to
    bf16. The kernel sums right only when `in_features` is a multiple of 32 (torch 2.13 CPU), so other
    widths dequantize and use F.linear. Compute-bound on this EPYC: 1.1-1.4x fp32 at batch 1.
  torch.compile cannot trace fbgemm's packed weights (an opaque ScriptObject), so under compilation
  `Int8Matmul` calls the kernel through an op of ours, `gptlab::fbgemm_linear`, which names the packed
  weights by a number (a registry of live `Int8Matmul`s, a constant of the graph) instead of holding
  them. A compiled fused decoder (infer/fused.py) thus keeps fbgemm, where it used "int8pack" before:
  SmolLM2-135M, 1 thread, loaded machine (load 4-6), three runs at batch 1: 51-76 tok/s against 48-61
  eager (+6 to +25%; int8pack compiled: 39.4 quiet), at batch 8 none (203 vs 218); first call ~50 s
  (~10 s with inductor's cache warm). Compiled and eager int8 tokens
  differ: fbgemm quantizes its input at run time, so the last-bit rounding differences of compiled code
  move its output by quantization steps (one ulp added to its inputs moves SmolLM2's logits by 1.4 at
  the median step, int8 vs fp32 by 2.0). Not worse for it: bits per byte through the compiled step,
  0.9347, lie among eager draws with one ulp of noise added (0.9347-0.9352; eager as is 0.9324)
  (docs/LOG.md, session 12).
- Not chosen (measured, docs/LOG.md): `torch._int_mm` (oneDNN) with activations quantized per row in
  eager ops, slower than fbgemm at every shape (the head 3.9 ms; presumably its weight is reordered each call);
  torchao 0.18 from PyPI ships only CUDA kernels, and its CPU int8 configs run eager as dequantize +
  fp32 mm (266 us for 3072 x 576 vs 135 fp32). int4: `_weight_int4pack_mm_for_cpu` (group 32, bf16)
  ran like "int8pack" on the layer shapes and 1.3x slower than fbgemm's int8 on the head, so int4 would
  cost quality for no speed here and is not offered.
- GGUF (interop.py): imported Q4/Q8 blocks are dequantized to float32, then `--quantize int8`
  requantizes per channel. No maintained CPU kernel here takes GGUF blocks as they are: fbgemm and
  int8pack take one scale per output channel, not one per 32-weight block (Q8_0, Q4_1); int4pack takes
  group-32 scales and zeros (Q4_1's shape) but measured no faster than int8 (above).
- Measured on SmolLM2-135M-Instruct (bench/results/quant.md, loaded 2-core AMD EPYC, 1 thread): bits per
  byte +0.63% with fbgemm (1.0192 vs 1.0128 fp32; int8pack +0.05%); decode 2.2-2.7x fp32 at batch 1 and
  3.5-3.9x at batch 8 (int8pack 2.3x and 1.8x in the same run); `gptlab sample` peak RSS from an int8
  model directory 816 MB (the packed copies), vs 1079 fp32 and 946 in transformers.
- A tied head shares the embedding's int8 rows: the head's per-output-channel scales are exactly
  per-row scales of the embedding, so one int8 table + scales serves the lookup (`QuantEmbedding`
  dequantizes the gathered rows) and the head, as one fp32 table served both.
- Only a plain `GPT` whose projections are plain `nn.Linear` can be quantized; anything else (LoRA
  wrappers, a reward model's head) is a `GptlabError` that names the modules.
- On disk (checkpoint.py): gptlab.json carries `"format": 2` and `"quantization": {"method": ...,
  "bits": 8}`; a quantized layer stores `<name>.weight` (int8) and `<name>.weight_scale` (float32).
  The kernel is a run-time choice over those rows, so session 10's int8 directories and this one's are
  the same files. A reader from before quantization checks `format == 1` and refuses the directory
  with "has format 2, expected 1"; this reader names a newer format as written by a newer gptlab.
"""

from __future__ import annotations

import itertools
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .common import GptlabError
from .model import GPT

QUANT_METHODS = {"int8": 8}  # the --quantize names and their bits
QUANT_METHOD_NAME = "int8-weight-only-per-channel"  # what gptlab.json records: the stored rows (module docstring)
KERNEL_DTYPE = torch.bfloat16  # activations go through the int8pack kernel in this dtype (module docstring)
KERNEL_K_MULTIPLE = 32  # in_features the int8pack kernel sums right (module docstring)
QUANTIZE_ROWS = 2048  # rows quantized at a time (bounds the float temporaries of a 49k-row embedding)


def bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 value >= each element of a positive float32 tensor (as float32), computed on x's
    device: the next bfloat16 above a positive one is the one whose bits are one higher (a CPU `inf` given
    to torch.nextafter with CUDA weights raised "Expected all tensors to be on the same device")."""
    rounded = x.to(torch.bfloat16)
    up = (rounded.view(torch.int16) + 1).view(torch.bfloat16)
    return torch.where(rounded.float() < x, up.float(), rounded.float())


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q, float32 scale) with weight[o] ~= scale[o] * q[o]: symmetric absmax per row, bf16-exact scales.
    All-zero rows get scale 1 (q = 0), so dequantizing never divides by zero."""
    w = weight.detach()
    absmax = torch.linalg.vector_norm(w, float("inf"), dim=1).float()  # max |w| per row, no |w| temporary
    scale = bf16_ceil(torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax)))
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for start in range(0, len(w), QUANTIZE_ROWS):  # in slices: float temporaries of a few MB, not of the table
        rows = slice(start, start + QUANTIZE_ROWS)
        q[rows] = torch.round(w[rows].float() / scale[rows, None]).clamp_(-127, 127)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


DYNAMIC_ENGINES = ("x86", "fbgemm")  # PyTorch quantized engines whose dynamic linear is fbgemm's (x86 CPUs)
# full 8-bit activations: with VNNI fbgemm sums u8 x s8 products in int32 and cannot saturate (7 bits,
# torch.ao's default for CPUs without VNNI, measured +2.8% bits per byte instead of +0.6%: docs/LOG.md)
REDUCE_RANGE = False


def int8_kernel_name(device: torch.device | str = "cpu") -> str:
    """The int8 kernel for weights on `device` (module docstring): "fbgemm" on an x86 CPU with AVX512-VNNI
    whose PyTorch quantized engine is fbgemm's, otherwise "int8pack" (ARM's qnnpack, older x86, GPUs)."""
    fbgemm = (torch.device(device).type == "cpu" and torch.backends.quantized.engine in DYNAMIC_ENGINES
              and torch.cpu.get_capabilities().get("avx512_vnni", False))
    return "fbgemm" if fbgemm else "int8pack"


def _fbgemm_pack(q: torch.Tensor, scale: torch.Tensor):
    """fbgemm's packed form of the int8 rows (a copy, in its own layout); the zero points are 0 (symmetric)."""
    with warnings.catch_warnings():  # torch 2.13 marks quantized tensor dtypes deprecated (docs/LOG.md)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qweight = torch._make_per_channel_quantized_tensor(
            q, scale.double(), torch.zeros(len(q), dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qweight, None)


def _fbgemm_linear(x: torch.Tensor, packed) -> torch.Tensor:
    """x (M, in) float32 through fbgemm's dynamic int8 linear, activations quantized per row: the op
    quantizes its whole input with one scale, so each row is first divided by its max |x| (then all rows
    share the range [-1, 1]) and its output multiplied back (module docstring)."""
    if len(x) == 1:
        return torch.ops.quantized.linear_dynamic(x, packed, REDUCE_RANGE)
    row_max = x.abs().amax(dim=1, keepdim=True).clamp_min_(torch.finfo(x.dtype).tiny)
    return torch.ops.quantized.linear_dynamic(x / row_max, packed, REDUCE_RANGE).mul_(row_max)


_PACKED: weakref.WeakValueDictionary[int, "Int8Matmul"] = weakref.WeakValueDictionary()  # handle -> live fbgemm matmul
_HANDLES = itertools.count()


def _fbgemm_linear_op(x: torch.Tensor, handle: int) -> torch.Tensor:
    """`_fbgemm_linear` over the packed weights of the `Int8Matmul` numbered `handle`: an op torch.compile
    can put in its graph (the handle is a constant of the graph), where it cannot trace the packed weights
    themselves, an opaque ScriptObject (dynamo: "Missing as_proxy()"). Registered as a plain CPU kernel
    of a `torch.library.Library` rather than with `torch.library.custom_op`, whose wrapper added 8.8 us
    of CPU a call to the bare 15-16 us of a 64 x 576 projection, against 2.4 for this (121 calls a SmolLM2
    step)."""
    return _fbgemm_linear(x, _PACKED[handle].packed)


_LIBRARY = torch.library.Library("gptlab", "FRAGMENT")  # kept alive: the registration lives as long as it
_LIBRARY.define("fbgemm_linear(Tensor x, int handle) -> Tensor")
_LIBRARY.impl("fbgemm_linear", _fbgemm_linear_op, "CPU")


@torch.library.register_fake("gptlab::fbgemm_linear", lib=_LIBRARY)
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], len(_PACKED[handle].q))


class Int8Matmul:
    """y = x (..., in) @ (scale * q).T (+ bias), in x's dtype, for one int8 weight q (out, in) with scales
    (out,), through `int8_kernel_name()`'s kernel. Built once per weight: fbgemm packs a copy of the rows.
    Under torch.compile the fbgemm kernel is called through the custom op `gptlab::fbgemm_linear`."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, kernel: str | None = None):
        self.q, self.scale = q, scale
        self.kernel = kernel or int8_kernel_name(q.device)
        self.packed = _fbgemm_pack(q, scale) if self.kernel == "fbgemm" else None
        self.kernel_scale = scale.to(KERNEL_DTYPE)
        self.handle = next(_HANDLES)
        if self.packed is not None:
            _PACKED[self.handle] = self

    def frozen_int8pack(self) -> Int8Matmul:
        """The same product through int8pack (bf16 activations), its rows and scales wrapped as
        nn.Parameters (the same storage) for a compiled CPU step that freezes its weights (infer/fused.py):
        inductor then offers its weight-only-int8 C++ GEMM, which at one row with 2 threads reads the int8
        rows at ~27 GB/s where fbgemm's dynamic linear reads ~16 with 1 or 2 threads (60 chained SmolLM2
        MLP products, cold; docs/LOG.md, session 13). fbgemm cannot be frozen: its packed weights are an
        opaque object."""
        matmul = Int8Matmul(nn.Parameter(self.q, requires_grad=False), self.scale, kernel="int8pack")
        matmul.kernel_scale = nn.Parameter(matmul.kernel_scale, requires_grad=False)
        return matmul

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel == "fbgemm" and x.dim() == 2 and x.dtype == torch.float32:
            # the decode step's case, without the reshape, view and dtype checks below: measured 33-35 us
            # against 39-45 us a call for a 1728 x 576 projection at batch 1 (1 thread, quiet), paid ~120
            # times a SmolLM2 step
            if torch.compiler.is_compiling():
                y = torch.ops.gptlab.fbgemm_linear(x, self.handle)
            else:
                y = _fbgemm_linear(x, self.packed)
            return y if bias is None else y + bias
        lead, k = x.shape[:-1], x.shape[-1]
        rows = x.reshape(-1, k)
        if self.packed is not None:
            y = _fbgemm_linear(rows.float(), self.packed)
        elif k % KERNEL_K_MULTIPLE:
            y = F.linear(rows, self.q.to(x.dtype)) * self.scale.to(x.dtype)
        else:
            # contiguous: a dense column-major x (a transposed 2-d view) stays so through `.to`, and the
            # kernel refuses it on CPU ("A must be contiguous on the last dimension")
            y = torch.ops.aten._weight_int8pack_mm(rows.to(KERNEL_DTYPE).contiguous(), self.q, self.kernel_scale)
        y = y.view(*lead, len(self.q))
        y = y if y.dtype == x.dtype else y.to(x.dtype)
        return y if bias is None else y + bias


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version


class _Int8Weights(nn.Module):
    """Base of the modules over int8 rows: `matmul()` is their `Int8Matmul`, built at first use and again
    whenever the rows or scales are replaced or changed in place (loading a state dict, `.to(dtype)`)."""

    def matmul(self) -> Int8Matmul:
        q, scale = self.weight, self.weight_scale
        key = (q.data_ptr(), scale.data_ptr(), scale.dtype, _version(q), _version(scale))
        cached = self.__dict__.get("_matmul")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_matmul"] = (key, Int8Matmul(q, scale))
        return cached[1]

    def __getstate__(self):  # copies (deepcopy, pickling) build their own
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k != "_matmul"}


class QuantLinear(_Int8Weights):
    """`nn.Linear` with an int8 weight (buffer `weight`, (out, in)) and per-output-channel float32 scales
    (buffer `weight_scale`); `bias` stays a floating-point parameter."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "QuantLinear":
        out = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device)
        out.weight, out.weight_scale = quantize_rows(linear.weight)
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul()(x, self.bias)


class QuantEmbedding(_Int8Weights):
    """`nn.Embedding` over int8 rows with per-row scales; a lookup dequantizes only the rows it reads, into
    the scales' dtype (float32, or the model's dtype after `.to(dtype)`: scales are bf16-exact)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None):
        super().__init__()
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, device=device))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        scale = self.weight_scale
        return F.embedding(idx, self.weight).to(scale.dtype) * scale[idx, None]


class QuantTiedHead(nn.Module):
    """The head of a tied model over the embedding's int8 rows and scales (module docstring). It refers to
    the embedding module without registering it, so the rows are stored, moved and cast once."""

    def __init__(self, table: QuantEmbedding):
        super().__init__()
        self.__dict__["table"] = table  # not a submodule: the embedding owns the rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table.matmul()(x)


def projections(model: GPT) -> dict[str, nn.Module]:
    """{name: module} of every projection a quantization replaces (head and attention/MLP linears)."""
    found = {"lm_head": model.lm_head}
    for i, block in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            found[f"model.layers.{i}.self_attn.{name}"] = getattr(block.self_attn, name)
        for name in ("gate_proj", "up_proj", "down_proj"):
            found[f"model.layers.{i}.mlp.{name}"] = getattr(block.mlp, name)
    return found


def check_quantizable(model: nn.Module) -> None:
    """GptlabError naming what cannot be quantized: not a plain GPT, or projections that are not nn.Linear."""
    if type(model) is not GPT:
        raise GptlabError(f"cannot quantize a {type(model).__name__}: only a plain GPT (model directory) is supported")
    odd = [f"{name} ({type(m).__name__})" for name, m in projections(model).items()
           if type(m) not in (nn.Linear, QuantLinear, QuantTiedHead)]
    if odd:
        raise GptlabError(f"cannot quantize layers that are not plain nn.Linear: {', '.join(odd[:5])}"
                          + (f" and {len(odd) - 5} more" if len(odd) > 5 else ""))


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())


def _quantized_linear(linear: nn.Linear) -> QuantLinear:
    """The int8 twin of `linear`; on the meta device an empty one (a skeleton to load a state dict into)."""
    if linear.weight.is_meta:
        return QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
    return QuantLinear.from_linear(linear)


@torch.no_grad()
def quantize_model(model: GPT, method: str = "int8") -> GPT:
    """Replace the projections (and a tied embedding with its head) by int8 ones, in place; returns `model`.
    On the meta device this builds the quantized skeleton that a quantized model directory loads into."""
    if method not in QUANT_METHODS:
        raise GptlabError(f"unknown quantization {method!r} (supported: {', '.join(QUANT_METHODS)})")
    check_quantizable(model)
    if is_quantized(model):
        return model
    # by name, one module at a time: holding them all would keep every float32 weight alive to the end
    for name in list(projections(model)):
        if name == "lm_head" and model.config.tie_embeddings:
            continue
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, _quantized_linear(getattr(owner, attr)))
    if model.config.tie_embeddings:
        weight = model.model.embed_tokens.weight
        table = QuantEmbedding(*weight.shape, device=weight.device)
        if not weight.is_meta:
            table.weight, table.weight_scale = quantize_rows(weight)
        model.model.embed_tokens = table
        model.lm_head = QuantTiedHead(table)
    return model


def add_quantize_arg(parser) -> None:
    """`--quantize int8`: the flag of every command that loads a model for inference (sample, chat, serve)."""
    parser.add_argument("--quantize", choices=sorted(QUANT_METHODS), default=None,
                        help="quantize the weights as they load (int8: per output channel; on x86 CPUs with "
                             "AVX512-VNNI activations are also quantized per row at run time; a quantized "
                             "model directory loads quantized without it)")
