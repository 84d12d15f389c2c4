"""Deformable DETR's ``MSDeformAttn`` layer, forward and hand-written backward.

NumPy parameters run on NumPy inputs (the Cython CPU op), CuPy parameters on CuPy
inputs (the CUDA op); :meth:`MSDeformAttn.to` moves a layer between the two. Nothing
here imports CuPy unless it is handed a CuPy array or module.

Axis letters: N batch, S value positions (S = sum_l H_l * W_l), M heads, D channels
per head, C = d_model = M * D, Lq queries, L levels, P points per head and level.

Layers follow a forward/backward protocol without an autograd framework: ``forward``
keeps what ``backward`` needs, ``backward`` returns the input gradients and adds the
parameter gradients into ``grads`` (``+=``, like PyTorch). Each ``forward`` allows one
``backward``; a second ``forward`` before ``backward`` replaces the kept activations.
Inputs are kept by reference, not copied: do not modify them in place in between.
"""
from __future__ import annotations

import math
from types import MappingProxyType

import numpy as np

from . import _validate
from .functional import ms_deform_attn, ms_deform_attn_backward

__all__ = ["Linear", "MSDeformAttn", "flatten_levels", "encoder_reference_points"]

_LAYER_DTYPES = ("float32", "float64")


# --------------------------------------------------------------------------- helpers

def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer; got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")
    return int(value)


def _layer_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be one of {', '.join(_LAYER_DTYPES)}; got {dtype!r}") from None
    if dt.name not in _LAYER_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(_LAYER_DTYPES)}; got {dt.name}")
    return dt


def _module_name(xp):
    return "CuPy" if xp is not np else "NumPy"


def _convert(arr, xp, dtype):
    """``arr`` as an ``xp`` array of ``dtype``, copying only when needed."""
    if xp is np and _validate._is_cupy(arr):
        arr = arr.get()  # CuPy refuses implicit device-to-host conversion
    return xp.asarray(arr, dtype=dtype)


def _check_array(name, arr, xp, dtype, ndim, layout):
    """Refuse anything but an ``xp`` array of ``dtype`` with ``ndim`` dimensions (any if None)."""
    on_gpu = _validate._is_cupy(arr)
    if not (on_gpu or isinstance(arr, np.ndarray)):
        raise TypeError(f"{name} must be a {_module_name(xp)} array {layout}; got {type(arr).__name__}")
    if on_gpu != (xp is not np):
        given, target = ("CuPy", "cupy") if on_gpu else ("NumPy", "numpy")
        raise TypeError(f"{name} is a {given} array but the layer's parameters are {_module_name(xp)} "
                        f"arrays; move the layer with .to({target})")
    if np.dtype(arr.dtype) != dtype:
        raise TypeError(f"{name} has dtype {arr.dtype} but the layer computes in {dtype.name}; cast the "
                        f"input or convert the layer with .to(dtype=...)")
    if ndim is not None:
        _validate.check_ndim(name, arr, ndim, layout)


def _xavier_uniform(rng, shape):
    """Glorot/Xavier uniform for a weight stored (out, in)."""
    bound = math.sqrt(6.0 / (shape[0] + shape[1]))
    return rng.uniform(-bound, bound, size=shape)


def _ray_offsets(n_heads, n_levels, n_points):
    """The paper's sampling-offset bias, (M * L * P * 2,): head m's points on ray m.

    theta_m = 2 pi m / M; the direction is scaled so its larger coordinate is 1 (the
    points sit on the square rings of radius 1..P pixels around the reference), and
    point p sits at (p + 1) times it on every level.
    """
    theta = np.arange(n_heads, dtype=np.float64) * (2.0 * math.pi / n_heads)
    rays = np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    rays /= np.abs(rays).max(axis=-1, keepdims=True)
    steps = np.arange(1, n_points + 1, dtype=np.float64)
    grid = rays[:, None, None, :] * steps[None, None, :, None]  # (M, 1, P, 2)
    return np.broadcast_to(grid, (n_heads, n_levels, n_points, 2)).reshape(-1)


# --------------------------------------------------------------------------- modules

class _Module:
    """Parameter bookkeeping shared by :class:`Linear` and :class:`MSDeformAttn`.

    Subclasses fill ``_params`` and ``_grads`` (name -> array, same names) and
    ``_xp`` / ``_dtype``.
    """

    _params: dict
    _grads: dict

    @property
    def params(self):
        """Read-only mapping name -> parameter array.

        The arrays are the live storage: update them in place (``p -= lr * g``) or
        through :meth:`load_state_dict`; the mapping itself refuses assignment.
        """
        return MappingProxyType(self._params)

    @property
    def grads(self):
        """Read-only mapping name -> gradient array (same names and shapes as ``params``).

        ``backward`` adds into these (``+=``); :meth:`zero_grad` clears them.
        """
        return MappingProxyType(self._grads)

    @property
    def xp(self):
        """The array module of the parameters: ``numpy`` or ``cupy``."""
        return self._xp

    @property
    def dtype(self):
        """The parameters' dtype (float32 or float64); inputs must match it."""
        return self._dtype

    def zero_grad(self):
        """Set every accumulated gradient to zero, in place."""
        for g in self._grads.values():
            g[...] = 0

    def state_dict(self):
        """Return ``{name: copy of the parameter}``, arrays of the layer's module and dtype.

        Names are PyTorch's, so ``numpy.savez(path, **layer.state_dict())`` writes a
        file :meth:`load_state_dict` reads back (CuPy layers: save
        ``cupy.asnumpy(v)``).
        """
        return {name: p.copy() for name, p in self._params.items()}

    def load_state_dict(self, state, *, prefix=""):
        """Copy parameters from a mapping name -> array, checking every name and shape.

        Parameters
        ----------
        state : mapping of str -> array-like
            A dict, the object ``numpy.load`` returns for an ``.npz`` file, or arrays
            converted from a PyTorch state dict. Values are cast to the layer's dtype
            and moved to its array module.
        prefix : str, keyword-only
            Only keys starting with ``prefix`` are read, with the prefix stripped, e.g.
            ``"transformer.encoder.layers.0.self_attn."`` for one layer of a full
            Deformable DETR checkpoint.

        Raises
        ------
        TypeError
            ``state`` is not a mapping, or a value is not a real numeric array.
        ValueError
            Names are missing or unexpected, or shapes differ; the message lists every
            offending name. Nothing is copied unless the whole mapping is accepted.
        """
        if not (hasattr(state, "keys") and hasattr(state, "__getitem__")):
            raise TypeError(f"load_state_dict expects a mapping of name -> array; got {type(state).__name__}")
        given = {key[len(prefix):]: key for key in state.keys() if isinstance(key, str) and key.startswith(prefix)}
        missing = [name for name in self._params if name not in given]
        unexpected = [prefix + name for name in given if name not in self._params]
        values, misshaped = {}, []
        for name, p in self._params.items():
            if name not in given:
                continue
            value = state[given[name]]
            shape = tuple(value.shape) if hasattr(value, "shape") else np.shape(value)
            if shape != tuple(p.shape):
                misshaped.append(f"{prefix + name} has shape {shape} but the layer needs {tuple(p.shape)}")
            values[name] = value
        if missing or unexpected or misshaped:
            parts = []
            if missing:
                parts.append("missing parameters: " + ", ".join(prefix + n for n in missing))
            if unexpected:
                parts.append("unexpected parameters: " + ", ".join(unexpected))
            if misshaped:
                parts.append("mis-shaped parameters: " + "; ".join(misshaped))
            raise ValueError(f"load_state_dict refused the mapping ({'; '.join(parts)})")
        for name, value in values.items():
            kind = np.dtype(value.dtype).kind if hasattr(value, "dtype") else np.asarray(value).dtype.kind
            if kind not in "fiu":
                raise TypeError(f"parameter {prefix + name} must hold real numbers; got dtype kind {kind!r}")
        converted = {name: _convert(v, self._xp, self._dtype) for name, v in values.items()}
        for name, v in converted.items():
            self._params[name][...] = v


def _slice_rows(x, x2):
    """Rows of ``x2`` (``x`` as 2-d) per slice of axis 0 for inputs with 3 or more axes
    (one image of a batch), else all of them (at least 1)."""
    if x.ndim >= 3 and x.shape[0] > 0:
        return max(x2.shape[0] // x.shape[0], 1)
    return max(x2.shape[0], 1)


class Linear(_Module):
    """Affine map ``y = x W^T + b`` with W stored (out, in), as PyTorch's ``nn.Linear``.

    Parameters
    ----------
    in_features, out_features : int
        Sizes of the last axis of the input and of the output.
    dtype : {"float32", "float64"}, keyword-only
        Parameter dtype; inputs must match it.
    seed : int, numpy.random.Generator or None, keyword-only
        Source of the initial values, PyTorch's default: weight and bias uniform in
        +-1/sqrt(in_features).

    Attributes
    ----------
    params, grads : mapping
        ``"weight"`` (out_features, in_features) and ``"bias"`` (out_features,).
    """

    def __init__(self, in_features, out_features, *, dtype="float32", seed=None):
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        self._dtype = _layer_dtype(dtype)
        self._xp = np
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(self.in_features)
        self._params = {
            "weight": rng.uniform(-bound, bound, (self.out_features, self.in_features)).astype(self._dtype),
            "bias": rng.uniform(-bound, bound, self.out_features).astype(self._dtype),
        }
        self._grads = {k: np.zeros_like(v) for k, v in self._params.items()}
        self._x = None

    def __repr__(self):
        return (f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"dtype={self._dtype.name}, xp={self._xp.__name__})")

    def forward(self, x):
        """Apply the map to the last axis.

        Parameters
        ----------
        x : array (..., in_features)

        Returns
        -------
        array (..., out_features)
        """
        _check_array("x", x, self._xp, self._dtype, None, "(..., in_features)")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must end in in_features = {self.in_features}; got shape {tuple(x.shape)}")
        self._x = x
        w, b = self._params["weight"], self._params["bias"]
        x2 = x.reshape(-1, self.in_features)
        rows = _slice_rows(x, x2)
        if rows >= x2.shape[0]:
            y = x2 @ w.T + b  # one 2-d GEMM: batched matmul over leading axes is slower in NumPy
        else:
            # One GEMM per slice of axis 0: a BLAS may round a row differently depending
            # on how many rows the call has (OpenBLAS on an AMD EPYC does), so this keeps
            # an image's output the same alone or in any batch (cydeform.dask relies on it).
            y = self._xp.empty((x2.shape[0], self.out_features), dtype=self._dtype)
            for start in range(0, x2.shape[0], rows):
                y[start:start + rows] = x2[start:start + rows] @ w.T + b
        return y.reshape(*x.shape[:-1], self.out_features)

    def backward(self, grad_y):
        """Accumulate ``weight`` and ``bias`` gradients; return the input's gradient.

        For an input with 3 or more axes the gradients are added one slice of axis 0
        (one image) at a time, in order, and the input's gradient is computed one slice
        at a time, so splitting a batch along axis 0 and adding the parts' gradients in
        order reproduces them bit for bit (at a fixed BLAS thread count).

        Parameters
        ----------
        grad_y : array (..., out_features)
            Gradient of the loss with respect to the last forward's output.

        Returns
        -------
        array (..., in_features)
        """
        if self._x is None:
            raise RuntimeError("Linear.backward() needs a preceding forward(); each forward() allows one backward()")
        x = self._x
        expected = (*x.shape[:-1], self.out_features)
        _check_array("grad_y", grad_y, self._xp, self._dtype, len(expected), "(..., out_features)")
        if tuple(grad_y.shape) != expected:
            raise ValueError(f"grad_y must have the forward output's shape {expected}; got {tuple(grad_y.shape)}")
        self._x = None
        g2 = grad_y.reshape(-1, self.out_features)
        x2 = x.reshape(-1, self.in_features)
        # Inputs with 3 or more axes (a batch of sequences) accumulate one slice of axis
        # 0 at a time, in order: a batch split along axis 0 into parts whose gradients
        # are added in order (cydeform.dask, gradient accumulation) gives the same bits.
        rows = _slice_rows(x, x2)
        w = self._params["weight"]
        grad_x = g2 @ w if rows >= x2.shape[0] else self._xp.empty(x2.shape, dtype=self._dtype)
        for start in range(0, max(x2.shape[0], 1), rows):
            g, xs = g2[start:start + rows], x2[start:start + rows]
            self._grads["weight"] += g.T @ xs
            self._grads["bias"] += g.sum(axis=0)
            if rows < x2.shape[0]:
                grad_x[start:start + rows] = g @ w  # per slice, as in forward()
        return grad_x.reshape(x.shape)

    def to(self, xp=None, dtype=None):
        """Move parameters and gradients to array module ``xp`` and/or cast to ``dtype``.

        Returns ``self``. Kept activations are dropped.
        """
        if xp is None:
            xp = self._xp
        elif getattr(xp, "__name__", None) not in ("numpy", "cupy"):
            raise TypeError(f"xp must be the numpy or cupy module; got {xp!r}")
        self._dtype = self._dtype if dtype is None else _layer_dtype(dtype)
        self._params = {k: _convert(v, xp, self._dtype) for k, v in self._params.items()}
        self._grads = {k: _convert(v, xp, self._dtype) for k, v in self._grads.items()}
        self._xp = xp
        self._x = None
        return self


class MSDeformAttn(_Module):
    """Multi-scale deformable attention layer (Deformable DETR's ``MSDeformAttn``).

    Parameters
    ----------
    d_model : int
        C, channels of queries, values and output; must be divisible by ``n_heads``.
    n_levels : int
        L, feature levels.
    n_heads : int
        M, attention heads (D = C / M channels each).
    n_points : int
        P, sampling points per head and level.
    dtype : {"float32", "float64"}, keyword-only
    seed : int, numpy.random.Generator or None, keyword-only
        Seeds the Xavier-uniform value and output projections.

    Attributes
    ----------
    params, grads : mapping
        PyTorch names and shapes: ``sampling_offsets.weight`` (M*L*P*2, C) and
        ``.bias``, ``attention_weights.weight`` (M*L*P, C) and ``.bias``,
        ``value_proj.weight`` (C, C) and ``.bias``, ``output_proj.weight`` (C, C) and
        ``.bias``.
    value_proj, output_proj : Linear

    Notes
    -----
    The offsets and the attention logits come from one fused projection of the query
    with 3*M*L*P outputs (the paper's formulation); ``sampling_offsets.*`` and
    ``attention_weights.*`` are views of its first 2*M*L*P and last M*L*P rows.

    Initialisation follows the paper's code: sampling-offset weight 0 and bias putting
    head m's points at 1..P pixels along ray m (angle 2 pi m / M), attention projection
    0 (uniform attention), value and output projections Xavier-uniform with zero bias.
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, *, dtype="float32", seed=None):
        self.d_model = _positive_int("d_model", d_model)
        self.n_levels = _positive_int("n_levels", n_levels)
        self.n_heads = _positive_int("n_heads", n_heads)
        self.n_points = _positive_int("n_points", n_points)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model must be divisible by n_heads; got d_model = {d_model}, n_heads = {n_heads}")
        self._dtype = _layer_dtype(dtype)
        self._xp = np
        C, MLP = self.d_model, self.n_heads * self.n_levels * self.n_points
        rng = np.random.default_rng(seed)
        # The sub-layers' default initialisation is replaced by the paper's below.
        self._query_proj = Linear(C, 3 * MLP, dtype=self._dtype)
        self.value_proj = Linear(C, C, dtype=self._dtype)
        self.output_proj = Linear(C, C, dtype=self._dtype)
        self._query_proj.params["weight"][...] = 0
        self._query_proj.params["bias"][...] = np.concatenate(
            [_ray_offsets(self.n_heads, self.n_levels, self.n_points), np.zeros(MLP)])
        for proj in (self.value_proj, self.output_proj):
            proj.params["weight"][...] = _xavier_uniform(rng, (C, C))
            proj.params["bias"][...] = 0
        self._bind()
        self._saved = None

    def __repr__(self):
        return (f"MSDeformAttn(d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
                f"n_points={self.n_points}, dtype={self._dtype.name}, xp={self._xp.__name__})")

    def _bind(self):
        """Expose the sub-layers' storage under the PyTorch names (views, not copies)."""
        k = 2 * self.n_heads * self.n_levels * self.n_points
        for attr, src in (("_params", "params"), ("_grads", "grads")):
            q = getattr(self._query_proj, src)
            v = getattr(self.value_proj, src)
            o = getattr(self.output_proj, src)
            setattr(self, attr, {
                "sampling_offsets.weight": q["weight"][:k], "sampling_offsets.bias": q["bias"][:k],
                "attention_weights.weight": q["weight"][k:], "attention_weights.bias": q["bias"][k:],
                "value_proj.weight": v["weight"], "value_proj.bias": v["bias"],
                "output_proj.weight": o["weight"], "output_proj.bias": o["bias"],
            })

    def to(self, xp=None, dtype=None):
        """Move parameters and gradients to array module ``xp`` (``numpy`` or ``cupy``)
        and/or cast them to ``dtype``; returns ``self``. Kept activations are dropped.
        """
        for proj in (self._query_proj, self.value_proj, self.output_proj):
            proj.to(xp, dtype)
        self._xp, self._dtype = self.value_proj.xp, self.value_proj.dtype
        self._bind()
        self._saved = None
        return self

    # ------------------------------------------------------------------ checks

    def _check_queries(self, query, reference_points, input_spatial_shapes):
        """Validate the query side; return N, Lq and the host (L, 2) spatial shapes."""
        xp, dt = self._xp, self._dtype
        _check_array("query", query, xp, dt, 3, "(N, Lq, C)")
        N, Lq, C = (int(s) for s in query.shape)
        if C != self.d_model:
            raise ValueError(f"query has C = {C} channels (last axis of shape {tuple(query.shape)}) "
                             f"but d_model = {self.d_model}")
        _check_array("reference_points", reference_points, xp, dt, 4, "(N, Lq, L, 2) or (N, Lq, L, 4)")
        rs = tuple(int(s) for s in reference_points.shape)
        if rs[3] not in (2, 4):
            raise ValueError(f"reference_points must end in 2 (x, y) or 4 (cx, cy, w, h); got shape {rs}")
        if rs[0] not in (1, N) or rs[1] != Lq or rs[2] != self.n_levels:
            raise ValueError(f"reference_points must have shape (N or 1, Lq, L, {rs[3]}) = "
                             f"({N} or 1, {Lq}, {self.n_levels}, {rs[3]}); got {rs}")
        shapes = _validate._host_int_array("input_spatial_shapes", input_spatial_shapes, 2, "(L, 2)")
        if shapes.shape != (self.n_levels, 2):
            raise ValueError(f"input_spatial_shapes must have shape (L, 2) = ({self.n_levels}, 2), rows (H_l, W_l); "
                             f"got shape {shapes.shape}")
        if (shapes <= 0).any():
            raise ValueError(f"input_spatial_shapes must hold positive (H_l, W_l); got {shapes.tolist()}")
        return N, Lq, shapes

    def _check_values(self, input_flatten, N, shapes, input_level_start_index, input_padding_mask):
        """Validate the value side; return S and the host (L,) level start offsets."""
        xp = self._xp
        _check_array("input_flatten", input_flatten, xp, self._dtype, 3, "(N, S, C)")
        Nv, S, C = (int(s) for s in input_flatten.shape)
        if Nv != N or C != self.d_model:
            raise ValueError(f"input_flatten must have shape (N, S, C) with N = {N} (from query) and "
                             f"C = d_model = {self.d_model}; got {tuple(input_flatten.shape)}")
        sizes = shapes[:, 0] * shapes[:, 1]
        if int(sizes.sum()) != S:
            raise ValueError(f"input_spatial_shapes describe sum(H_l * W_l) = {int(sizes.sum())} positions but "
                             f"input_flatten has S = {S} (axis 1)")
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
        if input_level_start_index is not None:
            given = _validate._host_int_array("input_level_start_index", input_level_start_index, 1, "(L,)")
            if not np.array_equal(given, starts):
                raise ValueError(f"input_level_start_index must be {starts.tolist()} for these "
                                 f"input_spatial_shapes; got {given.tolist()}")
        if input_padding_mask is not None:
            m = input_padding_mask
            if not hasattr(m, "dtype") or _validate._is_cupy(m) != (xp is not np):
                raise TypeError(f"input_padding_mask must be a {_module_name(xp)} bool array (N, S); "
                                f"got {type(m).__name__}")
            if m.dtype != np.bool_:
                raise TypeError(f"input_padding_mask must have dtype bool (True = padding); got {m.dtype}")
            if tuple(m.shape) != (N, S):
                raise ValueError(f"input_padding_mask must have shape (N, S) = {(N, S)}; got {tuple(m.shape)}")
        return S, starts

    # ------------------------------------------------------------------ forward

    def _sample(self, proj, reference_points, shapes):
        """Sampling locations and attention weights from the fused query projection.

        proj (N, Lq, 3*M*L*P) -> locations (N, Lq, M, L, P, 2), weights (N, Lq, M, L, P),
        plus what the backward of the location map needs.
        """
        xp, M, L, P = self._xp, self.n_heads, self.n_levels, self.n_points
        N, Lq = proj.shape[:2]
        k = 2 * M * L * P
        offsets = proj[..., :k].reshape(N, Lq, M, L, P, 2)
        logits = proj[..., k:].reshape(N, Lq, M, L * P)
        logits = logits - logits.max(axis=-1, keepdims=True)  # overflow-free softmax
        weights = xp.exp(logits)
        weights /= weights.sum(axis=-1, keepdims=True)
        ref = reference_points[:, :, None, :, None, :]  # (N or 1, Lq, 1, L, 1, 2 or 4)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: x divided by W_l, y by H_l.
            normalizer = xp.asarray(np.ascontiguousarray(shapes[:, ::-1]), dtype=self._dtype)[:, None, :]  # (L, 1, 2)
            loc = ref + offsets / normalizer
            geometry = (normalizer, None, None)
        else:
            # Offsets are in units of the box: P points reach half the box's width/height.
            loc = ref[..., :2] + offsets / P * ref[..., 2:] * 0.5
            geometry = (None, offsets, ref[..., 2:])
        return loc, weights.reshape(N, Lq, M, L, P), geometry

    def sampling_points(self, query, reference_points, input_spatial_shapes):
        """Where and how strongly each head looks, without running the attention.

        Keeps nothing for ``backward``; useful for plotting and for checks.

        Parameters
        ----------
        query : array (N, Lq, C)
        reference_points : array (N or 1, Lq, L, 2) or (N or 1, Lq, L, 4)
        input_spatial_shapes : integer array (L, 2)
            As in :meth:`forward`.

        Returns
        -------
        sampling_locations : array (N, Lq, M, L, P, 2)
            Normalised (x, y), as :func:`cydeform.ms_deform_attn` takes them.
        attention_weights : array (N, Lq, M, L, P)
            Softmax-normalised over L * P for each (n, q, m).
        """
        N, Lq, shapes = self._check_queries(query, reference_points, input_spatial_shapes)
        w, b = self._query_proj.params["weight"], self._query_proj.params["bias"]
        proj = query.reshape(N * Lq, self.d_model) @ w.T + b  # not Linear.forward: keep nothing
        loc, weights, _ = self._sample(proj.reshape(N, Lq, -1), reference_points, shapes)
        return loc, weights

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes,
                input_level_start_index=None, input_padding_mask=None):
        """Attend from each query to P points per head and level around its reference.

        Parameters
        ----------
        query : array (N, Lq, C)
            Query features (positional embedding already added).
        reference_points : array (N or 1, Lq, L, 2) or (N or 1, Lq, L, 4)
            Normalised (x, y) per query and level, in [0, 1] inside the (valid part of
            the) level; or boxes (cx, cy, w, h), whose size scales the offsets (box
            refinement). A leading 1 is broadcast over the batch.
        input_flatten : array (N, S, C)
            The L levels flattened row-major and concatenated (see :func:`flatten_levels`).
        input_spatial_shapes : integer array (L, 2)
            Rows (H_l, W_l).
        input_level_start_index : integer array (L,) or None
            Offsets of the levels in S; checked against ``input_spatial_shapes`` when
            given, derived from it otherwise.
        input_padding_mask : bool array (N, S) or None
            True marks padding: those value rows are zeroed after the projection.

        Returns
        -------
        array (N, Lq, C)
        """
        N, Lq, shapes = self._check_queries(query, reference_points, input_spatial_shapes)
        S, starts = self._check_values(input_flatten, N, shapes, input_level_start_index, input_padding_mask)
        xp, M = self._xp, self.n_heads
        value = self.value_proj.forward(input_flatten)
        if input_padding_mask is not None:
            value = xp.where(input_padding_mask[..., None], self._dtype.type(0), value)
        value = value.reshape(N, S, M, self.d_model // M)
        loc, weights, geometry = self._sample(self._query_proj.forward(query), reference_points, shapes)
        sampled = ms_deform_attn(value, shapes, starts, loc, weights)
        out = self.output_proj.forward(sampled)
        self._saved = (value, shapes, starts, loc, weights, geometry, input_padding_mask,
                       reference_points.shape[0])
        return out

    def backward(self, grad_output, *, deterministic=False):
        """Gradients of the last :meth:`forward` with respect to its floating inputs.

        Parameter gradients are added into ``grads``.

        Parameters
        ----------
        grad_output : array (N, Lq, C)
            Gradient of the loss with respect to the forward's output.
        deterministic : bool, keyword-only
            Passed to :func:`cydeform.ms_deform_attn_backward` (bit-reproducible value
            gradient on the GPU; the CPU is always deterministic).

        Returns
        -------
        grad_query : array (N, Lq, C)
        grad_reference_points : array with ``reference_points``' shape
            Summed over the batch when a leading 1 was broadcast. Box refinement
            detaches references: ignore it there.
        grad_input_flatten : array (N, S, C)
            Zero on padded rows.
        """
        if self._saved is None:
            raise RuntimeError("MSDeformAttn.backward() needs a preceding forward(); "
                               "each forward() allows one backward()")
        value, shapes, starts, loc, weights, (normalizer, offsets, box_wh), mask, ref_batch = self._saved
        N, S, M, D = value.shape
        Lq, L, P = loc.shape[1], self.n_levels, self.n_points
        _check_array("grad_output", grad_output, self._xp, self._dtype, 3, "(N, Lq, C)")
        if tuple(grad_output.shape) != (N, Lq, self.d_model):
            raise ValueError(f"grad_output must have the output's shape (N, Lq, C) = {(N, Lq, self.d_model)}; "
                             f"got {tuple(grad_output.shape)}")
        self._saved = None
        xp = self._xp

        grad_sampled = self.output_proj.backward(grad_output)
        grad_value, grad_loc, grad_weights = ms_deform_attn_backward(
            grad_sampled, value, shapes, starts, loc, weights, deterministic=deterministic)

        # Softmax over the L*P points of each (n, q, m): dz = a * (da - sum(a * da)).
        w = weights.reshape(N, Lq, M, L * P)
        gw = grad_weights.reshape(N, Lq, M, L * P)
        grad_logits = w * (gw - (w * gw).sum(axis=-1, keepdims=True))

        # loc = ref_xy + offsets * scale, with scale 1/(W_l, H_l) or box_wh * 0.5 / P.
        grad_ref_xy = grad_loc.sum(axis=(2, 4))  # (N, Lq, L, 2)
        if normalizer is not None:
            grad_offsets = grad_loc / normalizer
            grad_ref = grad_ref_xy
        else:
            grad_offsets = grad_loc / P * box_wh * 0.5
            grad_wh = (grad_loc * offsets).sum(axis=(2, 4)) / P * 0.5
            grad_ref = xp.concatenate([grad_ref_xy, grad_wh], axis=-1)
        if ref_batch == 1 and N > 1:
            grad_ref = grad_ref.sum(axis=0, keepdims=True)

        grad_proj = xp.concatenate([grad_offsets.reshape(N, Lq, -1), grad_logits.reshape(N, Lq, -1)], axis=-1)
        grad_query = self._query_proj.backward(grad_proj)

        grad_value = grad_value.reshape(N, S, M * D)
        if mask is not None:
            grad_value = xp.where(mask[..., None], self._dtype.type(0), grad_value)
        grad_input = self.value_proj.backward(grad_value)
        return grad_query, grad_ref, grad_input


# --------------------------------------------------------------------------- helpers around the layer

def flatten_levels(features):
    """Flatten a feature pyramid into the layer's value layout.

    Parameters
    ----------
    features : sequence of arrays (N, C, H_l, W_l)
        One map per level, all NumPy or all CuPy, one dtype, same N and C.

    Returns
    -------
    input_flatten : array (N, S, C)
        Levels flattened row-major (y, then x) and concatenated, in the features'
        array module and dtype.
    spatial_shapes : int64 NumPy array (L, 2)
        Rows (H_l, W_l). Host arrays even for CuPy features: the op reads them on the
        host, so keeping them there avoids a device round trip.
    level_start_index : int64 NumPy array (L,)
    """
    if not isinstance(features, (list, tuple)):
        raise TypeError(f"features must be a list or tuple of (N, C, H_l, W_l) arrays; got {type(features).__name__}")
    if not features:
        raise ValueError("features must hold at least one level")
    named = [(f"features[{i}]", f) for i, f in enumerate(features)]
    xp = _validate.array_module(*named)
    for name, f in named:
        if not (hasattr(f, "dtype") and hasattr(f, "shape")):
            raise TypeError(f"{name} must be an array (N, C, H_l, W_l); got {type(f).__name__}")
        _validate.check_ndim(name, f, 4, "(N, C, H_l, W_l)")
    N, C = (int(s) for s in features[0].shape[:2])
    for name, f in named[1:]:
        if tuple(f.shape[:2]) != (N, C):
            raise ValueError(f"{name} has (N, C) = {tuple(f.shape[:2])} but features[0] has {(N, C)}")
        if f.dtype != features[0].dtype:
            raise TypeError(f"{name} has dtype {f.dtype} but features[0] has {features[0].dtype}")
    input_flatten = xp.concatenate(
        [f.reshape(N, C, -1).transpose(0, 2, 1) for f in features], axis=1)
    spatial_shapes = np.array([tuple(f.shape[2:]) for f in features], dtype=np.int64)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    return input_flatten, spatial_shapes, level_start_index


def encoder_reference_points(spatial_shapes, valid_ratios=None, *, dtype=None):
    """Reference points of encoder queries: every pixel centre of every level.

    Follows Deformable DETR's ``get_reference_points``: the centre ((j + 0.5), (i + 0.5))
    of pixel (i, j) of level l is normalised by that level's valid extent
    (valid_ratio_l * W_l, valid_ratio_l * H_l), then multiplied by each level's valid
    ratio, giving the query's reference point on every level.

    Parameters
    ----------
    spatial_shapes : integer array (L, 2)
        Rows (H_l, W_l).
    valid_ratios : array (N, L, 2) or None
        Per image and level, the (x, y) fraction of the map that holds the image (1 when
        unpadded). None means no padding.
    dtype : dtype, keyword-only
        Defaults to ``valid_ratios``' dtype, or float32 without valid ratios.

    Returns
    -------
    array (N, S, L, 2), or (1, S, L, 2) when ``valid_ratios`` is None
        Normalised (x, y); :meth:`MSDeformAttn.forward` broadcasts a leading 1 over the
        batch. Same array module as ``valid_ratios`` (NumPy without it; move it with
        ``cupy.asarray`` for a CuPy layer).
    """
    shapes = _validate._host_int_array("spatial_shapes", spatial_shapes, 2, "(L, 2)")
    if shapes.shape[1] != 2 or shapes.shape[0] < 1 or (shapes <= 0).any():
        raise ValueError(f"spatial_shapes must have shape (L, 2) with positive rows (H_l, W_l); got {shapes.tolist()}")
    L = shapes.shape[0]
    # Host geometry per position s: pixel centre (x, y), level size (W, H), level index.
    centres, extents, levels = [], [], []
    for lvl, (H, W) in enumerate(shapes):
        y, x = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
        centres.append(np.stack([x.ravel(), y.ravel()], axis=-1))
        extents.append(np.broadcast_to([W, H], (H * W, 2)))
        levels.append(np.full(H * W, lvl))
    centres, extents, levels = np.concatenate(centres), np.concatenate(extents), np.concatenate(levels)
    if valid_ratios is None:
        dt = np.dtype("float32" if dtype is None else dtype)
        ref = (centres / extents).astype(dt)
        return np.ascontiguousarray(np.broadcast_to(ref[None, :, None, :], (1, ref.shape[0], L, 2)))
    xp = _validate.array_module(("valid_ratios", valid_ratios))
    if not hasattr(valid_ratios, "dtype") or valid_ratios.dtype.kind != "f":
        got = getattr(valid_ratios, "dtype", type(valid_ratios).__name__)
        raise TypeError(f"valid_ratios must be a floating array (N, L, 2); got {got}")
    _validate.check_ndim("valid_ratios", valid_ratios, 3, "(N, L, 2)")
    if tuple(valid_ratios.shape[1:]) != (L, 2):
        raise ValueError(f"valid_ratios must have shape (N, L, 2) with L = {L}; got {tuple(valid_ratios.shape)}")
    dt = valid_ratios.dtype if dtype is None else np.dtype(dtype)
    vr = valid_ratios.astype(dt, copy=False)
    extent = vr[:, xp.asarray(levels)] * xp.asarray(extents, dtype=dt)[None]  # (N, S, 2) valid W_l, H_l
    ref = xp.asarray(centres, dtype=dt)[None] / extent
    return ref[:, :, None, :] * vr[:, None, :, :]
