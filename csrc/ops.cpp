// Every fastattn op schema, declared once. Kernels register per backend in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA); fake kernels and autograd
// formulas live next to the Python wrappers in fastattn/_ops.py.
//
// The contract of each op (shapes, tie rules, NaN rules) is spelled out in
// fastattn/reference.py, whose `ref_*` functions are the ground truth.
#include <Python.h>
#include <torch/library.h>

#include "cpu/cpu_tuning.h"

namespace {

// fastattn._C.cpu_tuning() -> dict: the cache sizes the CPU kernels read and the tiles derived from
// them (fastattn.cpu_tuning wraps it). Introspection, not a tensor op: a module function, not a schema.
PyObject* cpu_tuning(PyObject*, PyObject*) {
  try {
    const auto& c = fastattn::cpu::cache_sizes();
    const auto& t = fastattn::cpu::cpu_tiling();
    return Py_BuildValue(
        "{s:L,s:L,s:L,s:{s:s,s:s,s:s},s:{s:L,s:L,s:L,s:L,s:L,s:L}}", "l1", (long long)c.l1, "l2", (long long)c.l2,
        "l3", (long long)c.l3, "source", "l1", c.l1_source.c_str(), "l2", c.l2_source.c_str(), "l3",
        c.l3_source.c_str(), "tiles", "lane_tile", (long long)t.lane_tile, "scan_piece", (long long)t.scan_piece,
        "l2_block", (long long)t.l2_block, "eval_band", (long long)t.eval_band, "panel_floats",
        (long long)t.panel_floats, "score_tile_floats", (long long)t.score_tile_floats);
  } catch (const c10::Error& e) {  // a malformed FASTATTN_CPU_CACHE
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

PyMethodDef methods[] = {{"cpu_tuning", cpu_tuning, METH_NOARGS, "CPU cache sizes and the tiles derived from them"},
                         {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import fastattn._C` loads this library, which registers the ops below (the
// extension-cpp pattern: the ops live in torch.ops; the module has only cpu_tuning).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fastattn, m) {
  // ---- CBAM -----------------------------------------------------------------
  // x: (N, C, H, W) -> avg, max: (N, C) in x.dtype; argmax: (N, C) int64 (first
  // index h*W+w of the max, first NaN wins); count: (N, C) int32 ties of the max.
  // split_ties only selects the tie rule of the backward (the autograd formula reads it).
  m.def("channel_pool(Tensor x, bool split_ties) -> (Tensor avg, Tensor max, Tensor argmax, Tensor count)");
  // mean and max over C of z = x * gate[:, :, None, None] (z rounded to x.dtype).
  // pooled: (N, 2, H, W) contiguous, [:, 0] = mean, [:, 1] = max; argmax/count: (N, H, W).
  m.def("gated_spatial_pool(Tensor x, Tensor gate, bool split_ties) -> (Tensor pooled, Tensor argmax, Tensor count)");
  // y = x * ch_gate[n, c] * sp_gate[n, h, w]; y keeps x's memory format.
  m.def("cbam_apply(Tensor x, Tensor ch_gate, Tensor sp_gate) -> Tensor");
  // Reductions of the backward of cbam_apply: grad_ch_gate (N, C), grad_sp_gate (N, H, W).
  m.def("cbam_apply_backward(Tensor grad_y, Tensor x, Tensor ch_gate, Tensor sp_gate) -> (Tensor, Tensor)");
  // Gradient of gated_spatial_pool with respect to gate: (N, C).
  m.def(
      "gated_spatial_pool_backward_gate(Tensor grad_pooled, Tensor x, Tensor gate, Tensor pooled, "
      "Tensor argmax, Tensor count, bool split_ties) -> Tensor");
  // The x-sized gradient of the whole CBAM graph in one pass: the sum of the
  // terms whose inputs are given (see fastattn.reference.ref_cbam_grad_x).
  m.def(
      "cbam_grad_x(Tensor x, Tensor? grad_y, Tensor? ch_gate, Tensor? sp_gate, "
      "Tensor? grad_pooled, Tensor? pooled, Tensor? sp_argmax, Tensor? sp_count, "
      "Tensor? grad_avg, Tensor? grad_max, Tensor? ch_max, Tensor? ch_argmax, Tensor? ch_count, "
      "bool split_ties) -> Tensor");
  // The spatial gate's k x k conv on the (N, 1 or 2, H, W) map, CPU only (the other backends use
  // cuDNN through F.conv2d): F.conv2d(x, weight, None, 1, padding), and its weight gradient.
  m.def("cbam_spatial_conv(Tensor x, Tensor weight, int[2] padding) -> Tensor");
  m.def("cbam_spatial_conv_weight_grad(Tensor grad_out, Tensor x, int kh, int kw, int[2] padding) -> Tensor");
  // The whole CBAM block at inference (BatchNorm on running statistics), CPU only, in two passes over
  // x: y from x, the shared MLP's weights w1 (hidden, C), w2 (C, hidden) (or 1x1 convs' (., ., 1, 1))
  // and biases, and the spatial gate's conv weight (1, 1 or 2, kh, kw) with its BatchNorm's weight,
  // bias, running mean and variance, eps; no conv_w: no spatial gate. light: timm's Light flavour
  // (one-channel conv input); max_first: conv input cat[max, mean], else cat[mean, max].
  m.def(
      "cbam_forward_eval(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? conv_w, "
      "Tensor? bn_weight, Tensor? bn_bias, Tensor? bn_mean, Tensor? bn_var, float bn_eps, int[2] padding, "
      "bool light, bool max_first) -> Tensor");
  // The same with y written over x (x NCHW- or channels_last-contiguous): a mutating op without
  // outputs, so that functionalization (torch.compile, export) turns it into auto_functionalized
  // and Inductor can write in place again; an alias returned, or out=, would not functionalize.
  m.def(
      "cbam_forward_eval_(Tensor(a!) x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? conv_w, "
      "Tensor? bn_weight, Tensor? bn_bias, Tensor? bn_mean, Tensor? bn_var, float bn_eps, int[2] padding, "
      "bool light, bool max_first) -> ()");

  // ---- Spatial attention ----------------------------------------------------
  // q: (N, Cq, Lq), k: (N, Cq, Lk), v: (N, Cv, Lk), any strides.
  // out: (N, Cv, Lq) in q.dtype, channel-last strides when q.stride(1) == 1;
  // lse: (N, heads, Lq) float32, natural log-sum-exp of the scaled logits.
  m.def("spatial_attention_forward(Tensor q, Tensor k, Tensor v, int heads, float scale) -> (Tensor out, Tensor lse)");
  // dq, dk, dv with the shape, dtype and layout of q, k, v.
  m.def(
      "spatial_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, int heads, float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
}
