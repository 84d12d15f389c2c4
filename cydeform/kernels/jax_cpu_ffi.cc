// XLA FFI handlers of cydeform.jax on the CPU: MSDA forward and backward on XLA's own
// buffers, no copies and no Python (and no GIL) on the call path.
//
// They do no arithmetic of their own: they call the C entry points of the Cython CPU
// backend (_c_forward_f32 etc. at the end of src/_cpu_impl.pxi, the same _forward and
// _backward the NumPy path runs), whose addresses cydeform/_jax_ffi.py hands over once
// through cyd_jax_set_entry_points. So results are bit-identical to
// cydeform.ms_deform_attn on NumPy arrays, and cydeform.set_num_threads applies.
//
// Compiled at first use of cydeform.jax against the headers of the installed jaxlib
// (jax.ffi.include_dir()) into a cache directory; see cydeform/_jax_ffi.py.
//
// Operands (row-major, any number B... of leading batch axes, which fold into N: this
// is how jax.vmap reaches the handler, vmap_method="broadcast_all"):
//   forward:  value (B..., N, S, M, D), loc (B..., N, Lq, M, L, P, 2),
//             attn (B..., N, Lq, M, L, P) -> out (B..., N, Lq, M*D)
//   backward: grad_out (B..., N, Lq, M*D), value, loc, attn
//             -> grad_value, grad_loc, grad_attn (the shapes of value, loc, attn)
// Attributes: spatial_shapes (L*2 int64, rows (H, W)), level_start_index (L int64),
// already validated in Python.
#include <cstddef>
#include <cstdint>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <typename T>
using ForwardFn = int (*)(const T*, const int64_t*, const int64_t*, const T*, const T*, T*, int64_t,
                          int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
template <typename T>
using BackwardFn = int (*)(const T*, const T*, const int64_t*, const int64_t*, const T*, const T*, T*,
                           T*, T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);

ForwardFn<float> forward_f32 = nullptr;
ForwardFn<double> forward_f64 = nullptr;
BackwardFn<float> backward_f32 = nullptr;
BackwardFn<double> backward_f64 = nullptr;

struct Sizes {
  int64_t N, S, M, D, Lq, L, P;
};

// Ask for transparent huge pages on the 2 MiB-aligned interior of a large output buffer
// before the backward first writes it, as NumPy does for every large array it allocates
// (numpy's madvise_hugepage, on by default on Linux). The backward scatters into
// grad_value at random rows; with 4 KiB pages that is TLB-bound (measured, float64
// decoder call: 28.6 ms against 16.0 ms for the NumPy path, whose grad_value gets huge
// pages). Advisory only: pages XLA already touched stay as they are.
void AdviseHugePages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(1) << 21;
  if (bytes < (size_t(4) << 20)) return;
  uintptr_t lo = (reinterpret_cast<uintptr_t>(data) + huge - 1) & ~(huge - 1);
  uintptr_t hi = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(huge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// Product of the leading axes of `dims` before the last `tail` (the batch, folded into N).
int64_t Leading(ffi::Span<const int64_t> dims, size_t tail) {
  int64_t n = 1;
  for (size_t i = 0; i + tail < dims.size(); ++i) n *= dims[i];
  return n;
}

// Sizes from value (..., S, M, D) and loc (..., Lq, M, L, P, 2); refuses inconsistent
// operands (Python validates first; this guards the raw pointers).
ffi::Error GetSizes(const ffi::AnyBuffer& value, const ffi::AnyBuffer& loc, const ffi::AnyBuffer& attn,
                    size_t num_levels, Sizes* s) {
  auto vd = value.dimensions();
  auto ld = loc.dimensions();
  auto ad = attn.dimensions();
  if (vd.size() < 4 || ld.size() < 6 || ad.size() != ld.size() - 1)
    return ffi::Error::InvalidArgument("cydeform: operand ranks do not match (N, S, M, D) / (N, Lq, M, L, P, 2)");
  s->N = Leading(vd, 3);
  s->S = vd[vd.size() - 3];
  s->M = vd[vd.size() - 2];
  s->D = vd[vd.size() - 1];
  size_t r = ld.size();
  s->Lq = ld[r - 5];
  s->L = ld[r - 3];
  s->P = ld[r - 2];
  if (Leading(ld, 5) != s->N || ld[r - 4] != s->M || ld[r - 1] != 2 || s->L != (int64_t)num_levels ||
      attn.element_count() * 2 != loc.element_count())
    return ffi::Error::InvalidArgument("cydeform: operand shapes do not agree");
  if (value.element_type() != loc.element_type() || value.element_type() != attn.element_type())
    return ffi::Error::InvalidArgument("cydeform: operands must share one dtype");
  return ffi::Error::Success();
}

// The C entry points' status: 0 done, 1 a scratch allocation failed, 2 a size out of range.
ffi::Error StatusError(int status) {
  if (status == 2) return ffi::Error::InvalidArgument("cydeform: a size is zero (S, M, D, Lq, L and P must be >= 1)");
  if (status != 0) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "cydeform: out of memory for scratch");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::AnyBuffer value, ffi::AnyBuffer loc, ffi::AnyBuffer attn,
                       ffi::Result<ffi::AnyBuffer> out, ffi::Span<const int64_t> shapes,
                       ffi::Span<const int64_t> starts) {
  Sizes s;
  if (auto err = GetSizes(value, loc, attn, starts.size(), &s); !err.success()) return err;
  if (shapes.size() != 2 * starts.size()) return ffi::Error::InvalidArgument("cydeform: bad spatial_shapes");
  if (out->element_count() != s.N * s.Lq * s.M * s.D || out->element_type() != value.element_type())
    return ffi::Error::InvalidArgument("cydeform: output has the wrong shape or dtype");
  int status;
  switch (value.element_type()) {
    case ffi::DataType::F32:
      if (!forward_f32) return ffi::Error::Internal("cydeform: entry points not set");
      status = forward_f32(value.typed_data<float>(), shapes.begin(), starts.begin(), loc.typed_data<float>(),
                           attn.typed_data<float>(), out->typed_data<float>(), s.N, s.S, s.M, s.D, s.Lq, s.L, s.P);
      break;
    case ffi::DataType::F64:
      if (!forward_f64) return ffi::Error::Internal("cydeform: entry points not set");
      status = forward_f64(value.typed_data<double>(), shapes.begin(), starts.begin(), loc.typed_data<double>(),
                           attn.typed_data<double>(), out->typed_data<double>(), s.N, s.S, s.M, s.D, s.Lq, s.L,
                           s.P);
      break;
    default:
      return ffi::Error::InvalidArgument("cydeform: the CPU backend computes in float32 or float64 only");
  }
  return StatusError(status);
}

ffi::Error BackwardImpl(ffi::AnyBuffer grad_out, ffi::AnyBuffer value, ffi::AnyBuffer loc, ffi::AnyBuffer attn,
                        ffi::Result<ffi::AnyBuffer> grad_value, ffi::Result<ffi::AnyBuffer> grad_loc,
                        ffi::Result<ffi::AnyBuffer> grad_attn, ffi::Span<const int64_t> shapes,
                        ffi::Span<const int64_t> starts) {
  Sizes s;
  if (auto err = GetSizes(value, loc, attn, starts.size(), &s); !err.success()) return err;
  if (shapes.size() != 2 * starts.size()) return ffi::Error::InvalidArgument("cydeform: bad spatial_shapes");
  auto t = value.element_type();
  if (grad_out.element_count() != s.N * s.Lq * s.M * s.D || grad_out.element_type() != t ||
      grad_value->element_count() != value.element_count() || grad_loc->element_count() != loc.element_count() ||
      grad_attn->element_count() != attn.element_count() || grad_value->element_type() != t ||
      grad_loc->element_type() != t || grad_attn->element_type() != t)
    return ffi::Error::InvalidArgument("cydeform: gradient buffers have the wrong shape or dtype");
  AdviseHugePages(grad_value->untyped_data(), grad_value->size_bytes());
  int status;
  switch (t) {
    case ffi::DataType::F32:
      if (!backward_f32) return ffi::Error::Internal("cydeform: entry points not set");
      status = backward_f32(grad_out.typed_data<float>(), value.typed_data<float>(), shapes.begin(), starts.begin(),
                            loc.typed_data<float>(), attn.typed_data<float>(), grad_value->typed_data<float>(),
                            grad_loc->typed_data<float>(), grad_attn->typed_data<float>(), s.N, s.S, s.M, s.D,
                            s.Lq, s.L, s.P);
      break;
    case ffi::DataType::F64:
      if (!backward_f64) return ffi::Error::Internal("cydeform: entry points not set");
      status = backward_f64(grad_out.typed_data<double>(), value.typed_data<double>(), shapes.begin(),
                            starts.begin(), loc.typed_data<double>(), attn.typed_data<double>(),
                            grad_value->typed_data<double>(), grad_loc->typed_data<double>(),
                            grad_attn->typed_data<double>(), s.N, s.S, s.M, s.D, s.Lq, s.L, s.P);
      break;
    default:
      return ffi::Error::InvalidArgument("cydeform: the CPU backend computes in float32 or float64 only");
  }
  return StatusError(status);
}

}  // namespace

extern "C" void cyd_jax_set_entry_points(void* f32, void* f64, void* b32, void* b64) {
  forward_f32 = reinterpret_cast<ForwardFn<float>>(f32);
  forward_f64 = reinterpret_cast<ForwardFn<double>>(f64);
  backward_f32 = reinterpret_cast<BackwardFn<float>>(b32);
  backward_f64 = reinterpret_cast<BackwardFn<double>>(b64);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(cyd_jax_forward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("spatial_shapes")
                                  .Attr<ffi::Span<const int64_t>>("level_start_index"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(cyd_jax_backward, BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("spatial_shapes")
                                  .Attr<ffi::Span<const int64_t>>("level_start_index"));
